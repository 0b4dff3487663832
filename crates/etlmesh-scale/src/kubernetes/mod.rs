//! The `kubernetes` scaler: each pipeline's workers are a Deployment or a StatefulSet
//! (the Helm chart's: a pod's name, which names its stream sessions, then belongs to
//! its slot), and scaling sets its replicas through the `scale` subresource (`PATCH
//! /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale`), which needs
//! only the `…/scale` permission. Kubernetes starts, restarts and stops the pods; a
//! pod gets SIGTERM on scale-down and the worker drains before it exits.
//!
//! The client comes from the in-cluster service account, or from the kubeconfig
//! (`KUBECONFIG`, `~/.kube/config`) outside a cluster (`config`); the one request it
//! makes goes over the hyper and rustls the mesh uses (`api`) — no Kubernetes client
//! library, whose build cost more than the rest of the scaling crate for this PATCH.

mod api;
pub mod config;

pub use config::{ClusterConfig, Credentials};

use crate::{BoxFuture, ScaleError, Scaler};

/// Field manager named in every patch, so that `kubectl` shows who set the replicas.
const FIELD_MANAGER: &str = "etlmesh-autoscaler";

/// What kind of workload runs a pipeline's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkloadKind {
    /// Pods named at random: a new name after every reschedule.
    #[default]
    Deployment,
    /// Pods named by their ordinal: the name stays with the slot.
    StatefulSet,
}

impl WorkloadKind {
    /// The resource in the API's paths.
    fn resource(self) -> &'static str {
        match self {
            Self::Deployment => "deployments",
            Self::StatefulSet => "statefulsets",
        }
    }

    /// The kind, as Kubernetes names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
        }
    }
}

/// Where the workloads are.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// The namespace (the client's default when `None`).
    pub namespace: Option<String>,
    /// The workload of a pipeline: `{pipeline}` is replaced by the pipeline's name,
    /// with `_` turned into `-` (Kubernetes names allow no `_`).
    pub deployment: String,
    /// Deployments or StatefulSets.
    pub kind: WorkloadKind,
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        Self {
            namespace: None,
            deployment: "etlmesh-worker-{pipeline}".into(),
            kind: WorkloadKind::Deployment,
        }
    }
}

/// Deployments scaled through the Kubernetes API.
pub struct KubernetesScaler {
    api: api::ApiClient,
    namespace: String,
    template: String,
    kind: WorkloadKind,
}

impl KubernetesScaler {
    /// Connects with the in-cluster config or the kubeconfig (read now; the API server
    /// is first asked at the first scaling decision).
    pub fn connect(options: KubernetesOptions) -> Result<Self, ScaleError> {
        let config = ClusterConfig::infer().map_err(|e| ScaleError::Connect {
            scaler: "kubernetes",
            message: format!(
                "{e}; run inside a cluster with a service account, or point KUBECONFIG at a kubeconfig"
            ),
        })?;
        Self::with_config(config, options)
    }

    /// Uses the given client configuration (a fake API server in tests).
    pub fn with_config(
        config: ClusterConfig,
        options: KubernetesOptions,
    ) -> Result<Self, ScaleError> {
        let namespace = options
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let api = api::ApiClient::new(&config).map_err(|message| ScaleError::Connect {
            scaler: "kubernetes",
            message,
        })?;
        tracing::info!(server = %config.server, namespace = %namespace, deployments = %options.deployment, "kubernetes scaler ready");
        Ok(Self {
            api,
            namespace,
            template: options.deployment,
            kind: options.kind,
        })
    }

    /// The workload that runs `pipeline`.
    pub fn deployment_name(&self, pipeline: &str) -> String {
        self.template
            .replace("{pipeline}", pipeline)
            .replace('_', "-")
            .to_ascii_lowercase()
    }
}

impl Scaler for KubernetesScaler {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    /// The workload's `spec.replicas`, read from its scale subresource.
    fn running<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Option<u32>, ScaleError>> {
        Box::pin(async move {
            let name = self.deployment_name(pool);
            let path = format!(
                "/apis/apps/v1/namespaces/{}/{}/{name}/scale",
                self.namespace,
                self.kind.resource()
            );
            let scale = self.api.get(&path).await.map_err(|e| ScaleError::Read {
                scaler: "kubernetes",
                pool: pool.to_string(),
                message: format!(
                    "GET the scale of {} `{name}`: {e}; check that it exists and that the service account may get {}/scale",
                    self.kind.as_str(),
                    self.kind.resource()
                ),
            })?;
            Ok(scale["spec"]["replicas"]
                .as_u64()
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
        })
    }

    fn set_replicas<'a>(
        &'a self,
        pool: &'a str,
        replicas: u32,
    ) -> BoxFuture<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let name = self.deployment_name(pool);
            let patch = serde_json::json!({ "spec": { "replicas": replicas } });
            let path = format!(
                "/apis/apps/v1/namespaces/{}/{}/{name}/scale?fieldManager={FIELD_MANAGER}",
                self.namespace,
                self.kind.resource()
            );
            let scale = self
                .api
                .merge_patch(&path, &patch)
                .await
                .map_err(|e| ScaleError::Failed {
                    scaler: "kubernetes",
                    pool: pool.to_string(),
                    replicas,
                    message: format!(
                        "PATCH the scale of {} `{name}`: {e}; check that it exists and that the service account may patch {}/scale",
                        self.kind.as_str(),
                        self.kind.resource()
                    ),
                })?;
            let now = scale["status"]["replicas"].as_u64().unwrap_or(0);
            tracing::info!(pipeline = pool, workload = %name, kind = self.kind.as_str(), replicas, running = now, "workload scaled");
            Ok(())
        })
    }

    /// Pods outlive the control plane: a restart of it must not stop the workers.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
