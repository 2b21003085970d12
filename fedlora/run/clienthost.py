"""A long-lived ClientApp host for one SuperNode: the base model is loaded once, not per message.

With its default ``--isolation subprocess`` a Flower 1.39 SuperNode starts a new
``flwr-clientapp`` process for every message, which imports torch and transformers and
rebuilds the model each time (10-24 s per message on 2 cores). ``flwr-clientapp`` itself
serves exactly one message per process (it needs a per-message token), so a long-lived
``flwr-clientapp`` is not possible. Instead, a SuperNode started with ``--isolation process``
leaves its messages to an external executor, and this process is that executor: it polls the
SuperNode's Runtime API for tasks (as ``flower-superexec`` does) and runs each one in-process
with fedlora's ClientApp, so ``fedlora.model.pretrained.cached_model`` and the tokenised data survive
from one message to the next. ``Context.state`` still travels through the SuperNode as usual.

  python -m fedlora.run.clienthost --runtime-api-address 127.0.0.1:9094

One task at a time, in the order the SuperNode hands them out. The host serves the ClientApp of
the installed fedlora (not the run's FAB): a run of another app is answered with an error.
"""

from __future__ import annotations

import argparse
import logging
import time

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedlora.clients.app import app as client_app

log = logging.getLogger("fedlora")

POLL_INTERVAL_S = 0.2


def runtime_client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # The Runtime API listens on the node's loopback; the node's own link to the SuperLink is TLS.
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
                                                 root_certificates=None, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str) -> None:
    """Pull one message and its context, run the ClientApp on it, push the reply and the
    updated context back (what ``flwr-clientapp`` does, without leaving the process)."""
    client = runtime_client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, _fab = pull_task_input(client)
        if not run.fab_id.endswith("/fedlora"):
            raise RuntimeError(f"this host serves fedlora's ClientApp, not '{run.fab_id}'")
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # a failed client is a normal event: reply with the error
        log.exception("ClientApp raised an exception")
        details = f"{type(error).__name__}: {error}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()


def serve(address: str) -> None:
    """Poll the SuperNode at ``address`` for ClientApp tasks forever."""
    client = runtime_client(address, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        task = client.AcquireTask(request)
        if task.HasField("task") and task.token:
            started = time.time()
            run_task(address, task.token)
            log.info("task done in %.2f s", time.time() - started)
        else:
            time.sleep(POLL_INTERVAL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API (its --port)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args.runtime_api_address)


if __name__ == "__main__":
    main()
