//! CacheRoute request filters: plain decisions over plain data. No filter opens a socket.
