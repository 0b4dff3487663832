//! The gateway's HTTP API as one table: every (method, path) it serves and the handler.
//! The router is built from it, and the OpenAPI test compares the document with the
//! same table — so that what is documented and what is served cannot drift apart.

use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, on};

use crate::{Gateway, http, jobs, openapi, query};

/// A router and the routes it was built with.
pub(crate) struct Api {
    pub router: Router<Arc<Gateway>>,
    pub served: Vec<(Method, &'static str)>,
}

impl Api {
    fn at<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<Gateway>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| unreachable!("the table names standard methods only"));
        self.router = self.router.route(path, on(filter, handler));
        self.served.push((method, path));
        self
    }
}

/// Every route of the gateway.
pub(crate) fn api() -> Api {
    Api {
        router: Router::new(),
        served: Vec::new(),
    }
    .at(Method::POST, "/v1/pipelines/{name}", http::transform)
    .at(Method::GET, "/v1/pipelines", http::list)
    .at(Method::POST, "/v1/jobs", jobs::submit)
    .at(Method::GET, "/v1/jobs", jobs::list)
    .at(Method::GET, "/v1/jobs/{id}", jobs::status)
    .at(Method::DELETE, "/v1/jobs/{id}", jobs::cancel)
    .at(Method::POST, "/v1/query", query::query)
    .at(Method::GET, "/v1/datasets", query::datasets)
    .at(Method::GET, "/healthz", http::healthz)
    .at(Method::GET, "/readyz", http::readyz)
    .at(Method::GET, "/metrics", http::metrics)
    .at(Method::GET, "/openapi.json", openapi::openapi)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every (method, path) the document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value = serde_json::from_str(openapi::OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                if ["get", "post", "put", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    out.insert((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_describes_what_the_router_serves_and_nothing_else() {
        let served: BTreeSet<(String, String)> = api()
            .served
            .iter()
            .map(|(m, p)| (m.to_string(), (*p).to_string()))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "served but not in openapi.json: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "in openapi.json but not served: {unserved:?}"
        );
    }
}
