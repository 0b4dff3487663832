//! Arrow Flight on its own port: `ListFlights`, `GetFlightInfo` and `GetSchema` list
//! the pipelines; `DoExchange` with a path descriptor `[pipeline]` sends a table and
//! returns the transformed one. The table travels to a worker as an Arrow IPC stream
//! body, like any HTTP request.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use bytes::Bytes;
use etlmesh_proto::{PipelineInfo, headers};
use etlmesh_telemetry::TraceContext;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyExt;
use tonic::{Request, Response, Status, Streaming};

use crate::Gateway;
use crate::dispatch::Refusal;
use crate::endpoint::Payload;
use crate::metrics::{PipelineLabels, RequestLabels};
use etlmesh_http::ApiError;

const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The Flight service of a gateway.
pub struct FlightGateway {
    gw: Arc<Gateway>,
}

impl FlightGateway {
    /// Flight in front of `gw`.
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
    }
}

type Stream_<T> = BoxStream<'static, Result<T, Status>>;

fn refusal(r: Refusal) -> Status {
    let msg = format!("{}: {r}", r.code());
    match r.status().as_u16() {
        404 => Status::not_found(msg),
        503 => Status::unavailable(msg),
        504 => Status::deadline_exceeded(msg),
        _ => Status::unavailable(msg),
    }
}

/// The longest pipeline name a descriptor may carry (names are identifiers).
const MAX_NAME: usize = 256;

/// A DoExchange descriptor names one pipeline: a path of one short element, no command.
fn check_descriptor(d: Option<&FlightDescriptor>) -> Result<(), Status> {
    let Some(d) = d else {
        return Err(Status::invalid_argument(
            "the first message must carry the descriptor [pipeline]",
        ));
    };
    let too_long = d.path.len() > 1
        || d.path.first().is_some_and(|p| p.len() > MAX_NAME)
        || d.cmd.len() > MAX_NAME;
    if too_long {
        return Err(Status::invalid_argument(format!(
            "the descriptor names one pipeline: FlightDescriptor.for_path(\"clean_readings\"), a name of at most {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

fn pipeline_of(d: &FlightDescriptor) -> Result<String, Status> {
    d.path.first().cloned().filter(|p| !p.is_empty()).ok_or_else(|| {
        Status::invalid_argument("give a path descriptor naming the pipeline: FlightDescriptor.for_path(\"clean_readings\")")
    })
}

fn schema_of(info: &PipelineInfo) -> Option<SchemaRef> {
    info.output_schema_ipc
        .as_deref()
        .and_then(etlmesh_codec::schema::schema_from_base64)
}

fn flight_info(info: &PipelineInfo) -> Result<FlightInfo, Status> {
    let mut fi =
        FlightInfo::new().with_descriptor(FlightDescriptor::new_path(vec![info.name.clone()]));
    if let Some(schema) = schema_of(info) {
        fi = fi
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?;
    }
    Ok(fi)
}

impl FlightGateway {
    /// The HTTP API's token rules, for Flight calls (`authorization` metadata).
    fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        action: crate::access::Action<'_>,
    ) -> Result<(), Status> {
        if !self.gw.access.required() {
            return Ok(());
        }
        let headers = metadata.clone().into_headers();
        match self.gw.access.authorize(&headers, action) {
            Ok(_) => Ok(()),
            Err(refusal) => {
                let m = format!("{}: {refusal}", refusal.code());
                Err(match refusal.status().as_u16() {
                    401 => Status::unauthenticated(m),
                    403 => Status::permission_denied(m),
                    _ => Status::resource_exhausted(format!(
                        "{m} (retry after {} s)",
                        refusal.retry_after().unwrap_or(1)
                    )),
                })
            }
        }
    }

    fn info(&self, name: &str) -> Result<PipelineInfo, Status> {
        self.gw
            .routes
            .pipelines()
            .into_iter()
            .map(|(i, _)| i)
            .find(|i| i.name == name)
            .ok_or_else(|| {
                Status::not_found(format!("unknown_pipeline: no pipeline named `{name}`"))
            })
    }

    async fn exchange(
        &self,
        trace: TraceContext,
        first: FlightData,
        rest: Streaming<FlightData>,
    ) -> Result<(HeaderMap, Vec<RecordBatch>, SchemaRef), Status> {
        let descriptor = first.flight_descriptor.clone().ok_or_else(|| {
            Status::invalid_argument("the first message must carry the descriptor [pipeline]")
        })?;
        let name = pipeline_of(&descriptor)?;
        let route = self.gw.lookup(&name).map_err(refusal)?;
        // pyarrow sends the descriptor alone first; arrow-rs sends it with the schema.
        let head = (!first.data_header.is_empty()).then_some(Ok(first));
        let inbound =
            futures::stream::iter(head).chain(rest.map_err(|s| FlightError::Tonic(Box::new(s))));
        let mut batches = FlightRecordBatchStream::new_from_flight_data(inbound);
        let max = self.gw.options.max_body_bytes;
        let mut size = 0usize;
        let mut pending = Vec::new();
        while let Some(b) = batches.next().await {
            let b = b.map_err(|e| {
                Status::invalid_argument(format!("bad_body: the Arrow data could not be read: {e}"))
            })?;
            size += b.get_array_memory_size();
            if size > max {
                return Err(Status::resource_exhausted(format!(
                    "payload_too_large: the table is over the gateway's limit of {max} bytes; send it in parts"
                )));
            }
            pending.push(b);
        }
        let schema = batches
            .schema()
            .cloned()
            .or_else(|| pending.first().map(|b| b.schema()))
            .ok_or_else(|| Status::invalid_argument("bad_body: no schema was sent"))?;
        let body = etlmesh_codec::encode::encode_to_vec(
            &pending,
            &schema,
            &etlmesh_codec::encode::EncodeOptions::new(etlmesh_config::Format::Arrow),
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ARROW_STREAM));
        h.insert(header::ACCEPT, HeaderValue::from_static(ARROW_STREAM));
        let payload = if body.len() <= self.gw.options.retry_buffer_bytes {
            Payload::Buffered(Bytes::from(body))
        } else {
            let full = http_body_util::Full::new(Bytes::from(body))
                .map_err(|e| match e {})
                .boxed_unsync();
            Payload::Streaming(parking_lot::Mutex::new(Some(full)))
        };
        let resp = self
            .gw
            .dispatch(
                route,
                h,
                payload,
                &trace.child(),
                self.gw.options.default_deadline,
            )
            .await
            .map_err(refusal)?;
        let (parts, mut body) = resp.response.into_parts();
        // Read frame by frame (not `Limited`, whose bound on a boxed error type trips
        // "`From` is not general enough" in tonic's `Send` futures).
        let mut bytes = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Status::unavailable(format!("the worker's answer could not be read: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > max {
                    return Err(Status::resource_exhausted(format!(
                        "the worker's answer is over {max} bytes"
                    )));
                }
                bytes.extend_from_slice(&data);
            }
        }
        let bytes = bytes.freeze();
        if !parts.status.is_success() {
            let err: Option<etlmesh_proto::ErrorBody> = serde_json::from_slice(&bytes).ok();
            let msg = err.map_or_else(
                || String::from_utf8_lossy(&bytes).into_owned(),
                |e| format!("{}: {}", e.code, e.message),
            );
            return Err(match parts.status.as_u16() {
                400 | 406 | 415 | 422 => Status::invalid_argument(msg),
                404 => Status::not_found(msg),
                413 => Status::resource_exhausted(msg),
                503 => Status::unavailable(msg),
                504 => Status::deadline_exceeded(msg),
                _ => Status::internal(msg),
            });
        }
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
                .map_err(|e| Status::internal(format!("the worker's answer is not Arrow: {e}")))?;
        let out_schema = reader.schema();
        let out: Vec<RecordBatch> = reader
            .collect::<Result<_, _>>()
            .map_err(|e| Status::internal(format!("the worker's answer is not Arrow: {e}")))?;
        Ok((parts.headers, out, out_schema))
    }
}

#[tonic::async_trait]
impl FlightService for FlightGateway {
    type HandshakeStream = Stream_<HandshakeResponse>;
    type ListFlightsStream = Stream_<FlightInfo>;
    type DoGetStream = Stream_<FlightData>;
    type DoPutStream = Stream_<PutResult>;
    type DoExchangeStream =
        Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;
    type DoActionStream = Stream_<arrow_flight::Result>;
    type ListActionsStream = Stream_<ActionType>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("no handshake is needed"))
    }

    async fn list_flights(
        &self,
        req: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.authorize(req.metadata(), crate::access::Action::List)?;
        let infos: Vec<Result<FlightInfo, Status>> = self
            .gw
            .routes
            .pipelines()
            .iter()
            .map(|(i, _)| flight_info(i))
            .collect();
        Ok(Response::new(futures::stream::iter(infos).boxed()))
    }

    async fn get_flight_info(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(req.metadata(), crate::access::Action::List)?;
        let name = pipeline_of(req.get_ref())?;
        Ok(Response::new(flight_info(&self.info(&name)?)?))
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("use GetFlightInfo"))
    }

    async fn get_schema(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.authorize(req.metadata(), crate::access::Action::List)?;
        let name = pipeline_of(req.get_ref())?;
        let schema = schema_of(&self.info(&name)?).ok_or_else(|| {
            Status::not_found(format!(
                "`{name}` declares no schema; its output depends on its input"
            ))
        })?;
        let r: SchemaResult = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(r))
    }

    async fn do_get(&self, _: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        Err(Status::unimplemented(
            "send a table with DoExchange and a path descriptor [pipeline]",
        ))
    }

    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented(
            "send a table with DoExchange and a path descriptor [pipeline]",
        ))
    }

    async fn do_exchange(
        &self,
        req: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        let started = Instant::now();
        let parent = req
            .metadata()
            .get(headers::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let trace = TraceContext::from_header_or_new(parent.as_deref());
        // Kept for the token check after the first message names the pipeline.
        let metadata = if self.gw.access.required() {
            req.metadata().clone()
        } else {
            tonic::metadata::MetadataMap::new()
        };
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty exchange: send the descriptor and the table")
        })?;
        let name = first
            .flight_descriptor
            .as_ref()
            .and_then(|d| d.path.first().cloned())
            .unwrap_or_default();
        // A name that is no pipeline is never a metrics label (each would be a series
        // kept for ever): it counts as `unknown`.
        let known = self.gw.routes.get(&name).is_some();
        let result = match check_descriptor(first.flight_descriptor.as_ref()) {
            Err(s) => Err(s),
            Ok(()) => {
                self.authorize(&metadata, crate::access::Action::Pipeline(&name))?;
                self.exchange(trace, first, inbound).await
            }
        };
        let name = if known { name } else { "unknown".into() };
        let code = match &result {
            Ok(_) => 200,
            Err(s) => match s.code() {
                tonic::Code::NotFound => 404,
                tonic::Code::InvalidArgument => 400,
                tonic::Code::Unavailable => 503,
                tonic::Code::DeadlineExceeded => 504,
                tonic::Code::ResourceExhausted => 413,
                _ => 500,
            },
        };
        let label = PipelineLabels {
            pipeline: name.clone(),
        };
        self.gw
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                pipeline: name,
                code,
            })
            .inc();
        self.gw
            .metrics
            .latency
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        let (worker_headers, batches, schema) = result.map_err(|mut s| {
            if let Ok(v) = trace.trace_id_hex().parse() {
                s.metadata_mut().insert(headers::TRACE_ID, v);
            }
            s
        })?;
        let out = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::iter(batches.into_iter().map(Ok)))
            .map_err(|e| Status::internal(e.to_string()));
        let mut resp = Response::new(Box::pin(out) as Self::DoExchangeStream);
        for h in [
            headers::RECORDS_IN,
            headers::RECORDS_OUT,
            headers::RECORDS_FILTERED,
            headers::RECORDS_DEAD_LETTERED,
            headers::WORKER,
            headers::TRACE_ID,
        ] {
            if let Some(v) = worker_headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                resp.metadata_mut().insert(h, v);
            }
        }
        Ok(resp)
    }

    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(Status::unimplemented("no actions"))
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(futures::stream::empty().boxed()))
    }
}
