"""The v2 protocol's gRPC endpoint (`inference.GRPCInferenceService`), on grpcio's asyncio
server, from the service definitions tritonclient[grpc] ships (service_pb2, service_pb2_grpc:
generated code). It shares the Service with the REST endpoint: the same models, limits,
batchers, sequences and metrics. ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer, ModelStreamInfer, ModelConfig and ModelStatistics are served; the
repository, shared-memory and trace calls answer UNIMPLEMENTED (the generated base class).

A client error is the status code Triton uses for it (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, ...) with the same message the REST endpoint gives, and the server goes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gru_deploy.errors import UserInputError
from gru_deploy.serve.server import (EXTENSIONS, ClientError, Service, array_from_raw, internal_error, raw_output,
                                     tensor_header)

log = logging.getLogger(__name__)

# Requests of one ModelStreamInfer stream in flight (read, not yet answered to the client) at
# most. Beyond it the server stops reading the stream until one is answered: backpressure, not
# refusal. Triton's clients (tritonclient's start_stream / async_stream_infer, perf_analyzer
# --streaming) queue on their side and never expect a stream request refused for load, while
# gRPC flow control makes an unread stream hold up its sender. 64 is the configs' default
# max_batch_size (one stream can fill a batch) and bounds one stream's memory to 64 requests
# (each within the body limit).
MAX_STREAM_IN_FLIGHT = 64


def status_code(http_status: int) -> Any:
    """The gRPC status code for a v2 error's HTTP status."""
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}.get(
        http_status, grpc.StatusCode.INTERNAL)


def parameter_values(parameters: Any) -> dict[str, Any]:
    """A request's `map<string, InferParameter>` as plain values (bool, int, str, float)."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "bool_param")
            for key, value in parameters.items()}


# The typed `contents` field of each datatype, when a client sends values instead of raw bytes.
CONTENTS_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "INT32": "int_contents"}


def decode_inputs(request: Any, limits: Any) -> dict[str, np.ndarray]:
    """The arrays of a ModelInferRequest: from raw_input_contents (tritonclient's default; one
    per input, in order) or from each input's typed contents, checked as the REST decoder checks."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ClientError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise ClientError(400, f"input {name!r} given twice")
        shape = [int(d) for d in tensor.shape]
        dtype, count = tensor_header(name, shape, tensor.datatype, limits)
        if raw:
            array = array_from_raw(name, raw[index], dtype, count)
        else:
            values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
            if len(values) != count:
                raise ClientError(400, f"input {name!r}: {len(values)} values for shape {shape}")
            array = np.asarray(values, dtype=dtype)
        arrays[name] = array.reshape(shape)
    return arrays


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The generated GRPCInferenceServiceServicer's methods over a Service; the calls not
    defined here answer UNIMPLEMENTED (`_unimplemented`, set below for each)."""

    def __init__(self, service: Service) -> None:
        self.service, self.pb = service, service_pb2

    async def _answer(self, context: Any, call: Any, request: Any = None) -> Any:
        """`call()`'s message (awaited where it is a coroutine), or the v2 error as a gRPC status
        (abort raises, ending the call)."""
        try:
            answer = call()
            return await answer if asyncio.iscoroutine(answer) else answer
        except ClientError as exc:
            self.service.refused("grpc", getattr(request, "model_name", None) or getattr(request, "name", ""), exc)
            await context.abort(status_code(exc.status), str(exc))
        except Exception as exc:  # a bug or a failed onnxruntime call: INTERNAL, and the server goes on
            log.exception("a gRPC call failed")
            await context.abort(status_code(500), internal_error(exc))

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # not while loading or draining
        return self.pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        def call() -> Any:
            self.service.target(request.name)
            return self.pb.ModelReadyResponse(ready=self.service.ready)
        return await self._answer(context, call, request)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Triton's statistics extension: every model's (an empty name) or one model's."""
        from google.protobuf import json_format

        return await self._answer(context, lambda: json_format.ParseDict(
            {"model_stats": self.service.statistics(request.name)}, self.pb.ModelStatisticsResponse()), request)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        from gru_deploy.versions import __version__

        return self.pb.ServerMetadataResponse(name="gru-deploy", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        def call() -> Any:
            meta = self.service.metadata(request.name)
            tensor = self.pb.ModelMetadataResponse.TensorMetadata
            return self.pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])
        return await self._answer(context, call, request)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return await self._answer(
            context, lambda: self.pb.ModelConfigResponse(config=self.service.config(request.name)), request)

    async def _infer(self, request: Any) -> Any:
        """One ModelInferRequest to its ModelInferResponse (raw_output_contents, as Triton answers)."""
        service = self.service
        arrival = service.arrival()
        try:
            arrays = decode_inputs(request, service.limits)
            requested = [o.name for o in request.outputs] or None
            target, result = await service.infer(request.model_name, arrays, parameter_values(request.parameters),
                                                 requested, arrival)
        finally:
            arrival.done()
        available = target.outputs(result)
        response = self.pb.ModelInferResponse(model_name=target.name, model_version="1", id=request.id)
        for name in requested or target.default_outputs:
            datatype, compute = available[name]
            array = compute()
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(raw_output(datatype, array))
        return response

    async def _observed(self, request: Any) -> Any:
        """`_infer`, counted in the metrics and statistics (Service.observed)."""
        with self.service.observed("grpc", request.model_name):
            return await self._infer(request)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._answer(context, lambda: self._observed(request), request)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """tritonclient's start_stream / async_stream_infer: each request is queued in the order it
        arrives (so a sequence's chunks run in order), answered as it completes; an error is the
        response's error_message and the stream goes on. At most MAX_STREAM_IN_FLIGHT requests
        are read and not yet answered (the stream is read no further until one is); a request's
        task is dropped as soon as it completes, so a long stream holds only those in flight."""
        answers: asyncio.Queue = asyncio.Queue()
        in_flight = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)  # released once its answer is sent
        tasks: set[asyncio.Task] = set()

        async def one(request: Any) -> None:
            try:
                answer = self.pb.ModelStreamInferResponse(infer_response=await self._observed(request))
            except ClientError as exc:
                self.service.refused("grpc", request.model_name, exc)
                answer = self.pb.ModelStreamInferResponse(error_message=str(exc))
            except Exception as exc:
                log.exception("gRPC ModelStreamInfer request failed")
                answer = self.pb.ModelStreamInferResponse(error_message=internal_error(exc))
            await answers.put(answer)

        def track(task: asyncio.Task) -> None:  # held only while it runs
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def read() -> None:
            async for request in request_iterator:
                await in_flight.acquire()  # backpressure: wait for an answer before taking more
                track(asyncio.create_task(one(request)))
                await asyncio.sleep(0)  # let it reach the queue before the next request is read
            while tasks:
                await asyncio.wait(set(tasks))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                in_flight.release()
        finally:
            reader.cancel()
            for task in set(tasks):
                task.cancel()


def _unimplemented(method: str) -> Any:
    async def call(self: Servicer, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"gru-deploy serve does not implement {method}")
    return call


for _method in [m for m in vars(service_pb2_grpc.GRPCInferenceServiceServicer)
                if m[:1].isupper() and m not in vars(Servicer)]:
    setattr(Servicer, _method, _unimplemented(_method))


async def start_grpc(service: Service, host: str, port: int) -> tuple[Any, int]:
    """grpcio's asyncio server with the Servicer on host:port (0: any free port); the server
    and the port it bound. Messages are limited to the REST body limit."""
    size = service.limits.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", size),
                                      ("grpc.max_send_message_length", max(size, 64 << 20))])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(service), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise UserInputError(f"cannot listen for gRPC on {host}:{port} (in use?); choose another --grpc-port")
    await server.start()
    return server, bound
