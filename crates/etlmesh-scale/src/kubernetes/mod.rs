//! The `kubernetes` scaler: each pipeline's workers are a Deployment, and scaling sets
//! its replicas through the `scale` subresource (`PATCH
//! /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`), which needs only the
//! `deployments/scale` permission. Kubernetes starts, restarts and stops the pods; a
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

/// Where the Deployments are.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// The namespace (the client's default when `None`).
    pub namespace: Option<String>,
    /// The Deployment of a pipeline: `{pipeline}` is replaced by the pipeline's name,
    /// with `_` turned into `-` (Kubernetes names allow no `_`).
    pub deployment: String,
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        Self {
            namespace: None,
            deployment: "etlmesh-worker-{pipeline}".into(),
        }
    }
}

/// Deployments scaled through the Kubernetes API.
pub struct KubernetesScaler {
    api: api::ApiClient,
    namespace: String,
    template: String,
}

impl KubernetesScaler {
    /// Connects with the in-cluster config or the kubeconfig.
    pub async fn connect(options: KubernetesOptions) -> Result<Self, ScaleError> {
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
        })
    }

    /// The Deployment that runs `pipeline`.
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

    fn set_replicas<'a>(
        &'a self,
        pool: &'a str,
        replicas: u32,
    ) -> BoxFuture<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let name = self.deployment_name(pool);
            let patch = serde_json::json!({ "spec": { "replicas": replicas } });
            let path = format!(
                "/apis/apps/v1/namespaces/{}/deployments/{name}/scale?fieldManager={FIELD_MANAGER}",
                self.namespace
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
                        "PATCH the scale of Deployment `{name}`: {e}; check that it exists and that the service account may patch deployments/scale"
                    ),
                })?;
            let now = scale["status"]["replicas"].as_u64().unwrap_or(0);
            tracing::info!(pipeline = pool, deployment = %name, replicas, running = now, "deployment scaled");
            Ok(())
        })
    }

    /// Pods outlive the control plane: a restart of it must not stop the workers.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
