//! The `x-cacheroute-*` headers: decisions shown to clients, and carried from a
//! scheduler gateway to a proxy gateway. Defined once in the wire crate
//! ([`cacheroute_wire::headers`]); re-exported here so `crate::headers::...` paths stay.

pub use cacheroute_wire::headers::*;
