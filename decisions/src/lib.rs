//! CacheRoute request filters: plain decisions over plain data. No filter opens a socket.
pub mod balance;
pub mod bm25;
pub mod cost_model;
pub mod errmsg;
pub mod injection;
pub mod kdn_jobs;
pub mod layout;
pub mod openai;
pub mod prefix_tree;
pub mod prompt;
pub mod scheduler;
