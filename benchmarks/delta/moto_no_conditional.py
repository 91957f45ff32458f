"""NEGATIVE CONTROL ONLY: moto S3 server that IGNORES If-None-Match / If-Match (like an S3-compatible
store without conditional-write support). Used to prove the concurrency test can detect lost commits."""
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

app = DomainDispatcherApplication(create_backend_app)


def strip_conditionals(environ, start_response):
    environ.pop("HTTP_IF_NONE_MATCH", None)
    environ.pop("HTTP_IF_MATCH", None)
    return app(environ, start_response)


run_simple(sys.argv[1], int(sys.argv[2]), strip_conditionals, threaded=True)
