"""Start/stop moto's standalone S3 server on loopback for the S3 experiments."""
import os, socket, subprocess, sys, time, contextlib
import boto3

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(bucket="delta", no_conditional=False):
    port = free_port()
    log = open(f"/tmp/delta-research/logs/moto-{port}.log", "w")
    cmd = ([sys.executable, "/tmp/delta-research/moto_no_conditional.py", "127.0.0.1", str(port)] if no_conditional
           else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    proc = subprocess.Popen(cmd,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET, region_name=REGION)
        s3.create_bucket(Bucket=bucket)
        storage_options = {
            "AWS_ENDPOINT_URL": endpoint,      # custom endpoint (path-style is the default)
            "AWS_ALLOW_HTTP": "true",          # required for http:// endpoints
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
        }
        yield endpoint, s3, storage_options, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
