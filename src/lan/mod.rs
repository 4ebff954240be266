//! LAN discovery: the UDP packet format shared with the original peerix.
//!
//! The UDP thread that answers and asks over broadcast comes with the LAN
//! mode; for now this holds the wire codec.

pub mod packet;
