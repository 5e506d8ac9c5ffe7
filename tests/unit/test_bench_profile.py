"""bench/cpu_profile.py's stage classifier: real py-spy stacks (root first) -> stages."""

from __future__ import annotations

import pytest

from bench import cpu_profile as p

THREAD = "Thread._bootstrap (threading.py:1002);Thread._bootstrap_inner (threading.py:1045)"
POOL = f"{THREAD};Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83);_WorkItem.run (concurrent/futures/thread.py:58)"
LOOP = (
    "_run_module_as_main (<frozen runpy>:198);<module> (app/cli.py:442);cmd_serve (app/cli.py:150);"
    "run (uvicorn/main.py:632);Server.run (uvicorn/server.py:86);Runner.run (asyncio/runners.py:118)"
)
ASGI = (
    f"{LOOP};RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:422);"
    "FastAPI.__call__ (fastapi/applications.py:1224);MetricsMiddleware.__call__ (app/middleware.py:239);"
    "BodyLimitMiddleware.__call__ (app/middleware.py:338);"
    "wrap_app_handling_exceptions.<locals>.wrapped_app (starlette/_exception_handler.py:42);"
    "Router.__call__ (starlette/routing.py:683);APIRoute.handle (fastapi/routing.py:1373);"
    "request_response.<locals>.app.<locals>.app (fastapi/routing.py:161)"
)
ROUTE = f"{ASGI};get_request_handler.<locals>.app (fastapi/routing.py:762);run_endpoint_function (fastapi/routing.py:381)"
MODEL = (
    f"{POOL};build_state.<locals>.run_batch (app/state.py:249);LoadedModel.run_batch (app/registry.py:75);"
    "Predictor.rows (model/predictor.py:62);predict (model/engine.py:122);"
    "Module._call_impl (torch/nn/modules/module.py:1794);Classifier.forward (model/engine.py:48)"
)

CASES = {
    "model": (
        f"{MODEL};AlexNet.forward (model/network.py:55);Conv2d._conv_forward (torch/nn/modules/conv.py:560)",
        p.MODEL,
    ),
    "normalise in the forward": (
        f"{MODEL};Module._call_impl (torch/nn/modules/module.py:1794);Normalize.forward (model/transforms.py:125)",
        p.RESIZE,
    ),
    "decode": (
        f"{POOL};Predictor.decode (model/predictor.py:51);decode_image (model/images.py:93);ImageFile.load (PIL/ImageFile.py:425)",
        p.DECODE,
    ),
    "decode, torchvision.io": (
        f"{POOL};Predictor.decode (model/predictor.py:51);_fast_jpeg (model/images.py:141);decode_jpeg (torchvision/io/image.py:332);OpOverloadPacket.__call__ (torch/_ops.py:1350)",
        p.DECODE,
    ),
    "resize": (
        f"{POOL};Predictor.decode (model/predictor.py:52);EvalTransform.__call__ (model/transforms.py:75);resize_image (torchvision/transforms/v2/functional/_geometry.py:344);interpolate (torch/nn/functional.py:5257)",
        p.RESIZE,
    ),
    "multipart": (
        f"{ROUTE};classify (app/routes/classify.py:191);read_form (app/intake.py:137);MultiPartParser.parse (starlette/formparsers.py:266);MultipartParser._internal_write (python_multipart/multipart.py:1431)",
        p.MULTIPART,
    ),
    "body receive under the form parser": (
        f"{ROUTE};classify (app/routes/classify.py:191);read_form (app/intake.py:137);_Marker.watch (app/intake.py:158);Request.stream (starlette/requests.py:243);RequestResponseCycle.receive (uvicorn/protocols/http/httptools_impl.py:560)",
        p.HTTP,
    ),
    "http parsing": (
        f"{LOOP};HttpToolsProtocol.data_received (uvicorn/protocols/http/httptools_impl.py:174);HeaderDeadlineProtocol.on_headers_complete (app/protocol.py:186)",
        p.HTTP,
    ),
    "dependencies": (
        f"{ASGI};get_request_handler.<locals>.app (fastapi/routing.py:528);solve_dependencies (fastapi/dependencies/utils.py:742);unwrap (inspect.py:752)",
        p.ROUTING,
    ),
    "query validation (pydantic under fastapi)": (
        f"{ASGI};get_request_handler.<locals>.app (fastapi/routing.py:528);request_params_to_args (fastapi/dependencies/utils.py:995);ModelField.validate (fastapi/_compat/v2.py:120);TypeAdapter.validate_python (pydantic/type_adapter.py:420)",
        p.ROUTING,
    ),
    "sync dependency on a worker thread": (
        f"{THREAD};WorkerThread.run (anyio/_backends/_asyncio.py:1124);get_state (app/deps.py:20)",
        p.ROUTING,
    ),
    "response model built in the route": (
        f"{ROUTE};classify (app/routes/classify.py:206);_predictions (app/routes/classify.py:93);BaseModel.__init__ (pydantic/main.py:280)",
        p.RESPONSE,
    ),
    "response serialised": (
        f"{ASGI};get_request_handler.<locals>.app (fastapi/routing.py:784);serialize_response (fastapi/routing.py:358);ModelField.serialize_json (fastapi/_compat/v2.py:231);TypeAdapter.dump_json (pydantic/type_adapter.py:651)",
        p.RESPONSE,
    ),
    "response body": (
        f"{ASGI};Response.__init__ (starlette/responses.py:46);Response.render (starlette/responses.py:52)",
        p.RESPONSE,
    ),
    "response written": (
        f"{ASGI};Response.__call__ (starlette/responses.py:171);SecurityHeadersMiddleware.__call__.<locals>.send_with_headers (app/middleware.py:92);RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:480)",
        p.HTTP,
    ),
    "security headers": (
        f"{ASGI};Response.__call__ (starlette/responses.py:171);SecurityHeadersMiddleware.__call__.<locals>.send_with_headers (app/middleware.py:92)",
        p.MIDDLEWARE,
    ),
    "metrics from the route": (
        f"{ROUTE};classify (app/routes/classify.py:207);judge (app/routes/classify.py:163);Metrics.answered (app/metrics.py:73);MetricWrapperBase.labels (prometheus_client/metrics.py:181)",
        p.METRICS,
    ),
    "access log": (
        f"{LOOP};RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:500);Logger.info (logging/__init__.py:1489);Logger._log (logging/__init__.py:1634)",
        p.LOGGING,
    ),
    "thread hop to the decoder": (
        f"{ROUTE};classify (app/routes/classify.py:198);classify_bytes (app/routes/classify.py:132);Decoder.__call__ (app/intake.py:182);ThreadPoolExecutor.submit (concurrent/futures/thread.py:175)",
        p.QUEUE,
    ),
    "batcher": (
        f"{LOOP};MicroBatcher._worker (app/batching.py:251);MicroBatcher._run (app/batching.py:260);_stack (app/batching.py:84)",
        p.QUEUE,
    ),
    "route code": (
        f"{ROUTE};classify (app/routes/classify.py:202);new_prediction_id (app/schemas.py:38);token_hex (secrets.py:59)",
        p.ROUTE,
    ),
    "uvloop, native": (LOOP, p.LOOP),
    "idle pool thread": (
        f"{THREAD};WorkerThread.run (anyio/_backends/_asyncio.py:1113);Queue.get (queue.py:171);Condition.wait (threading.py:327)",
        p.WAIT,
    ),
    "idle executor thread": (
        f"{THREAD};Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81)",
        p.WAIT,
    ),
    "unknown library": (f"{POOL};something (somelib/core.py:3)", p.OTHER),
}


@pytest.mark.parametrize("stack, stage", CASES.values(), ids=CASES.keys())
def test_stage_of_a_stack(stack: str, stage: str) -> None:
    assert p.classify_stack(["thread (4201): model_0", *stack.split(";")]) == stage


def test_parse_raw_reads_threads_and_counts() -> None:
    text = f"thread (4201): model_0;{MODEL} 67\nthread (0x7f00): MainThread;{LOOP} 3\n"
    samples = p.parse_raw(text)
    assert [(s.tid, s.name, s.count) for s in samples] == [
        (4201, "model_0", 67),
        (0x7F00, "MainThread", 3),
    ]
    assert p.classify_stack(samples[0].frames) == p.MODEL


def test_attribution_spreads_thread_cpu_over_active_samples() -> None:
    samples = p.parse_raw(
        f"thread (1): model_0;{MODEL} 3\nthread (1): model_0;{THREAD};Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 50\n"
        f"thread (2): decode_0;{POOL};Predictor.decode (model/predictor.py:51);decode_image (model/images.py:93) 1\n"
    )
    before = p.CpuSnapshot({10: 0}, {1: (0, "python"), 2: (0, "python"), 3: (0, "python")})
    after = p.CpuSnapshot({10: 1000}, {1: (300, "python"), 2: (100, "python"), 3: (500, "python")})
    att = p.attribute(samples, before, after)
    tick = p.TICK_S
    assert att.stage_s[p.MODEL] == pytest.approx(300 * tick)  # waits excluded
    assert att.stage_s[p.DECODE] == pytest.approx(100 * tick)
    assert att.stage_s[p.MODEL_NATIVE] == pytest.approx(500 * tick)  # never sampled
    assert att.stage_s[p.EXITED] == pytest.approx(100 * tick)  # process total minus live threads
    assert att.total_s == pytest.approx(1000 * tick)
