//! [`Store`]: the key-value store a completed round hands to its members (PyTorch's
//! `torch.distributed.Store` subset used by launchers: set, get, add, compare-set, wait, ...).

use std::time::Duration;

use async_trait::async_trait;

use crate::RendezvousError;

/// A key-value store scoped to one run and round. Keys are strings, values bytes.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value`.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled call may or may not have written the value.
    async fn set(&self, key: &str, value: &[u8]) -> Result<(), RendezvousError>;

    /// The value of `key`, waiting until it exists (bounded by the store's timeout).
    ///
    /// # Errors
    /// [`RendezvousError::Timeout`] naming the key if it does not appear in time.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn get(&self, key: &str) -> Result<Vec<u8>, RendezvousError>;

    /// As [`Store::get`] with an explicit timeout.
    ///
    /// # Errors
    /// [`RendezvousError::Timeout`] naming the key if it does not appear in time.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, RendezvousError>;

    /// Atomically adds `delta` to the integer counter `key` (created as 0) and returns the new
    /// value.
    ///
    /// # Errors
    /// [`RendezvousError::State`] if `key` holds something that is not a decimal integer.
    ///
    /// # Cancel safety
    /// Cancel safe, but a cancelled call may or may not have added.
    async fn add(&self, key: &str, delta: i64) -> Result<i64, RendezvousError>;

    /// Sets `key` to `desired` if its value is `expected` (an empty `expected` matches a missing
    /// key); returns the value after the call.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn compare_set(
        &self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, RendezvousError>;

    /// Waits until all `keys` exist.
    ///
    /// # Errors
    /// [`RendezvousError::Timeout`] naming the missing keys.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), RendezvousError>;

    /// True if all `keys` exist.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn check(&self, keys: &[&str]) -> Result<bool, RendezvousError>;

    /// Deletes `key`; true if it existed.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn delete_key(&self, key: &str) -> Result<bool, RendezvousError>;

    /// The number of keys in the store.
    ///
    /// # Errors
    /// [`RendezvousError::Connection`] if the backend fails.
    ///
    /// # Cancel safety
    /// Cancel safe.
    async fn num_keys(&self) -> Result<u64, RendezvousError>;
}
