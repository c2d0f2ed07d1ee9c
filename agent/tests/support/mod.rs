//! Test support shared by the agent integration tests.

pub mod mock_api;
