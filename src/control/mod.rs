//! The control front ends: the line protocol of the control pipe, the socket (or inherited fd)
//! that serves it, the events it reports, and the embedding API.

pub mod api;
pub mod events;
pub mod protocol;
pub(crate) mod socket;
