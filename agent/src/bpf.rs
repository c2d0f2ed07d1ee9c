//! The only code that touches aya: loading and attaching the kernel programs,
//! pinning, and reading and writing the maps.

pub mod capacity;
pub mod counters;
pub mod events;
pub mod frames;
pub mod inspect;
pub mod loader;
pub mod pin_lock;
pub mod socket_guard;
pub mod writer;

pub use counters::{read_counters, CounterSample};
pub use loader::{Dataplane, DataplaneOptions, LoadError};
pub use portcullis_common::PolicySlot;
pub use writer::{DesiredState, WriteError};
