//! The operator's error type: one enum for the reconciler, with a short
//! `reason()` (event reason, status reason) and a `metric_label()`.
//!
//! No variant carries a Secret's value: Secret errors name the Secret and the
//! key, never the content.

use kube::runtime::finalizer;

/// Errors of the reconciler and the operator runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),

    /// A referenced Secret does not exist.
    #[error("Secret {namespace}/{name} (referenced by {field}) not found")]
    SecretNotFound {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// The RunnerPool field that references it.
        field: &'static str,
    },

    /// A referenced Secret exists but lacks the key (or the value is not UTF-8).
    #[error("Secret {namespace}/{name} has no usable key {key:?} (referenced by {field})")]
    SecretKeyMissing {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// The missing key.
        key: String,
        /// The RunnerPool field that references it.
        field: &'static str,
    },

    /// The spec failed validation.
    #[error("invalid spec: {}", .0.join("; "))]
    InvalidSpec(Vec<String>),

    /// An owned object could not be built from the spec.
    #[error("cannot build objects: {0}")]
    Build(#[from] crate::resources::BuildError),

    /// An object of the same name exists but is not owned by this RunnerPool.
    #[error("{kind} {namespace}/{name} exists and is not owned by this RunnerPool")]
    NotOwned {
        /// Kind of the clashing object.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },

    /// (De)serialisation of an object failed.
    #[error("serialisation error: {0}")]
    Serde(#[from] serde_json::Error),

    /// The finalizer helper failed (boxed: the type refers to `Error`).
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),

    /// A required API (CRD) is not served by the cluster.
    #[error("{0}")]
    MissingApi(String),

    /// This instance lost the leader Lease and must stop acting.
    #[error("lost leadership of Lease {0}")]
    LostLeadership(String),

    /// A deleted RunnerPool waits for its VMs to finish (deletionPolicy
    /// Drain); not a failure.
    #[error("draining: waiting for {0} VM(s) to power off")]
    Draining(u32),

    /// Startup or runtime failure outside reconciliation.
    #[error("{0}")]
    Runtime(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short PascalCase reason, for events and status conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::SecretNotFound { .. } | Error::SecretKeyMissing { .. } => {
                crate::crd::REASON_SECRET_NOT_FOUND
            }
            Error::InvalidSpec(_) | Error::Build(_) => crate::crd::REASON_INVALID_SPEC,
            Error::NotOwned { .. } => "NameConflict",
            Error::Serde(_) => "SerializationError",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.reason()
                }
                _ => "FinalizerError",
            },
            Error::MissingApi(_) => "MissingApi",
            Error::LostLeadership(_) => "LostLeadership",
            Error::Draining(_) => "Draining",
            Error::Runtime(_) => "RuntimeError",
        }
    }

    /// Label value for the reconcile error counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::SecretNotFound { .. } => "secret_not_found",
            Error::SecretKeyMissing { .. } => "secret_key_missing",
            Error::InvalidSpec(_) | Error::Build(_) => "invalid_spec",
            Error::NotOwned { .. } => "not_owned",
            Error::Serde(_) => "serde",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.metric_label()
                }
                _ => "finalizer",
            },
            Error::MissingApi(_) => "missing_api",
            Error::LostLeadership(_) => "lost_leadership",
            Error::Draining(_) => "draining",
            Error::Runtime(_) => "runtime",
        }
    }

    /// Whether retrying without a change to the object can help. Permanent
    /// errors (invalid spec, missing Secret, name clash) wait for a change of
    /// the RunnerPool or the Secret instead of being retried in a loop.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::SecretNotFound { .. }
            | Error::SecretKeyMissing { .. }
            | Error::InvalidSpec(_)
            | Error::Build(_)
            | Error::NotOwned { .. } => true,
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.is_permanent()
                }
                _ => false,
            },
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_errors_name_the_secret_not_the_value() {
        let e = Error::SecretKeyMissing {
            namespace: "ns".into(),
            name: "api".into(),
            key: "token".into(),
            field: "spec.circleci.apiTokenSecretRef",
        };
        let msg = e.to_string();
        assert!(msg.contains("ns/api"), "{msg}");
        assert!(msg.contains("\"token\""), "{msg}");
        assert_eq!(e.reason(), "SecretNotFound");
        assert!(e.is_permanent());
    }

    #[test]
    fn finalizer_errors_expose_the_inner_reason() {
        let inner = Error::InvalidSpec(vec!["spec.a: bad".into(), "spec.b: worse".into()]);
        assert_eq!(
            inner.to_string(),
            "invalid spec: spec.a: bad; spec.b: worse"
        );
        let e = Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(inner)));
        assert_eq!(e.reason(), "InvalidSpec");
        assert_eq!(e.metric_label(), "invalid_spec");
        assert!(e.is_permanent());
        let e = Error::Finalizer(Box::new(finalizer::Error::UnnamedObject));
        assert_eq!(e.metric_label(), "finalizer");
        assert!(!e.is_permanent());
    }

    #[test]
    fn transient_errors_are_retried() {
        assert!(!Error::Runtime("x".into()).is_permanent());
        assert!(!Error::LostLeadership("ns/l".into()).is_permanent());
    }
}
