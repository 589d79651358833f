//! [`HandlerRegistry`]: creates a [`RendezvousHandler`] from [`RendezvousParameters`] by
//! backend name. The process-wide [`default_registry`] has the `etcd` backend registered.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;

use crate::{RendezvousError, RendezvousHandler, RendezvousParameters};

/// A function that creates a handler from parameters.
pub type HandlerCreator = Arc<
    dyn Fn(
            RendezvousParameters,
        ) -> BoxFuture<'static, Result<Arc<dyn RendezvousHandler>, RendezvousError>>
        + Send
        + Sync,
>;

/// Why the registry refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A backend name must not be empty.
    #[error("the rendezvous backend name must be a non-empty string")]
    EmptyName,
    /// The name is taken.
    #[error("the rendezvous backend '{0}' is already registered")]
    AlreadyRegistered(String),
    /// No backend of that name.
    #[error("the rendezvous backend '{name}' is not registered; known backends: {}", known.join(", "))]
    UnknownBackend {
        /// The requested name.
        name: String,
        /// The registered names.
        known: Vec<String>,
    },
    /// The created handler reports another backend name than the one requested.
    #[error(
        "the rendezvous backend '{actual}' does not match the requested backend '{requested}'"
    )]
    BackendMismatch {
        /// The name the handler reports.
        actual: String,
        /// The name that was requested.
        requested: String,
    },
}

/// A map from backend names to handler creators.
#[derive(Default)]
pub struct HandlerRegistry {
    creators: Mutex<BTreeMap<String, HandlerCreator>>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRegistry")
            .field("backends", &self.backends())
            .finish()
    }
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in backends (`etcd`).
    pub fn with_builtin_backends() -> Self {
        let registry = Self::new();
        registry
            .register("etcd", crate::etcd::handler_creator())
            .expect("a new registry has no backends yet");
        registry
    }

    /// Registers `creator` under `name`.
    ///
    /// # Errors
    /// [`RegistryError::EmptyName`] or [`RegistryError::AlreadyRegistered`].
    pub fn register(&self, name: &str, creator: HandlerCreator) -> Result<(), RegistryError> {
        if name.trim().is_empty() {
            return Err(RegistryError::EmptyName);
        }
        let mut creators = self.lock();
        if creators.contains_key(name) {
            return Err(RegistryError::AlreadyRegistered(name.to_string()));
        }
        creators.insert(name.to_string(), creator);
        Ok(())
    }

    /// The registered backend names, sorted.
    pub fn backends(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Creates a handler for `params.backend`.
    ///
    /// # Errors
    /// [`RegistryError::UnknownBackend`] (listing the known ones), whatever the creator
    /// returns, or [`RegistryError::BackendMismatch`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn create_handler(
        &self,
        params: RendezvousParameters,
    ) -> Result<Arc<dyn RendezvousHandler>, RendezvousError> {
        params.validate()?;
        let requested = params.backend.clone();
        let creator = self.lock().get(&requested).cloned();
        let creator = creator.ok_or_else(|| RegistryError::UnknownBackend {
            name: requested.clone(),
            known: self.backends(),
        })?;
        let handler = creator(params).await?;
        if handler.backend() != requested {
            return Err(RegistryError::BackendMismatch {
                actual: handler.backend().to_string(),
                requested,
            }
            .into());
        }
        Ok(handler)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, HandlerCreator>> {
        // A poisoned lock only means a creator panicked while we held it; the map is intact.
        self.creators.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The process-wide registry, with the built-in backends registered.
pub fn default_registry() -> &'static HandlerRegistry {
    static REGISTRY: OnceLock<HandlerRegistry> = OnceLock::new();
    REGISTRY.get_or_init(HandlerRegistry::with_builtin_backends)
}

/// Creates a handler through the [`default_registry`].
///
/// # Errors
/// As [`HandlerRegistry::create_handler`].
///
/// # Cancel safety
/// Cancel safe.
pub async fn create_handler(
    params: RendezvousParameters,
) -> Result<Arc<dyn RendezvousHandler>, RendezvousError> {
    default_registry().create_handler(params).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(backend: &str) -> RendezvousParameters {
        RendezvousParameters::new(backend, "localhost:1", "job", 1, 1).unwrap()
    }

    #[derive(Debug)]
    struct Fake(&'static str);

    #[async_trait::async_trait]
    impl RendezvousHandler for Fake {
        fn backend(&self) -> &str {
            self.0
        }
        fn run_id(&self) -> &str {
            "job"
        }
        async fn next_rendezvous(&self) -> Result<crate::RendezvousInfo, RendezvousError> {
            Err(RendezvousError::Other("fake".into()))
        }
        async fn is_closed(&self) -> Result<bool, RendezvousError> {
            Ok(false)
        }
        async fn set_closed(&self) -> Result<(), RendezvousError> {
            Ok(())
        }
        async fn num_nodes_waiting(&self) -> Result<usize, RendezvousError> {
            Ok(0)
        }
        async fn shutdown(&self) -> Result<bool, RendezvousError> {
            Ok(true)
        }
    }

    fn creator(name: &'static str) -> HandlerCreator {
        Arc::new(move |_| {
            Box::pin(async move { Ok(Arc::new(Fake(name)) as Arc<dyn RendezvousHandler>) })
        })
    }

    #[tokio::test]
    async fn creates_a_registered_backend() {
        let r = HandlerRegistry::new();
        r.register("fake", creator("fake")).unwrap();
        let h = r.create_handler(params("fake")).await.unwrap();
        assert_eq!(h.backend(), "fake");
    }

    #[test]
    fn registering_a_name_twice_is_an_error() {
        let r = HandlerRegistry::new();
        r.register("fake", creator("fake")).unwrap();
        let err = r.register("fake", creator("fake")).unwrap_err();
        assert_eq!(err, RegistryError::AlreadyRegistered("fake".into()));
    }

    #[test]
    fn empty_name_is_an_error() {
        let r = HandlerRegistry::new();
        assert_eq!(
            r.register(" ", creator("x")).unwrap_err(),
            RegistryError::EmptyName
        );
    }

    #[tokio::test]
    async fn unknown_backend_lists_known_ones() {
        let r = HandlerRegistry::new();
        r.register("b", creator("b")).unwrap();
        r.register("a", creator("a")).unwrap();
        let err = r.create_handler(params("zookeeper")).await.unwrap_err();
        match err {
            RendezvousError::Registry(RegistryError::UnknownBackend { name, known }) => {
                assert_eq!(name, "zookeeper");
                assert_eq!(known, vec!["a".to_string(), "b".to_string()]);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn handler_must_report_the_requested_backend() {
        let r = HandlerRegistry::new();
        r.register("fake", creator("other")).unwrap();
        let err = r.create_handler(params("fake")).await.unwrap_err();
        assert!(
            matches!(
                err,
                RendezvousError::Registry(RegistryError::BackendMismatch { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn default_registry_has_etcd() {
        assert_eq!(default_registry().backends(), vec!["etcd".to_string()]);
    }
}
