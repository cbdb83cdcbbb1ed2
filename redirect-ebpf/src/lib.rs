//! Empty library target: lets `redirect` declare this crate as a build-dependency, so cargo
//! rebuilds the user-space binary (which embeds the object) whenever the datapath changes.
#![no_std]
