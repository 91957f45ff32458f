"""Q4 (part 1): what S3 conditional-write semantics does moto's standalone server emulate?
delta-rs 1.6 commits a log entry with object_store `rename_if_not_exists`, which on S3 is
`copy_if_not_exists` = "multipart" (set by deltalake-aws): CreateMultipartUpload +
UploadPartCopy + CompleteMultipartUpload with `If-None-Match: *`, then DELETE of the tmp file.
Plain PutObject with If-None-Match: * is what object_store uses for PutMode::Create."""
import botocore, moto
from motoserver import moto_server

print("moto", moto.__version__, "botocore", botocore.__version__)


def code(e):
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


with moto_server() as (endpoint, s3, so, pid):
    B = "delta"
    # 1. PutObject If-None-Match: *
    s3.put_object(Bucket=B, Key="a", Body=b"1", IfNoneMatch="*")
    try:
        s3.put_object(Bucket=B, Key="a", Body=b"2", IfNoneMatch="*")
        print("PutObject If-None-Match:* on existing key -> SUCCEEDED (NOT emulated!)")
    except botocore.exceptions.ClientError as e:
        print("PutObject If-None-Match:* on existing key ->", code(e))
    print("  content still:", s3.get_object(Bucket=B, Key="a")["Body"].read())

    # 2. PutObject If-Match: <etag>
    etag = s3.head_object(Bucket=B, Key="a")["ETag"]
    try:
        s3.put_object(Bucket=B, Key="a", Body=b"3", IfMatch='"deadbeef"')
        print("PutObject If-Match wrong etag -> SUCCEEDED (NOT emulated)")
    except botocore.exceptions.ClientError as e:
        print("PutObject If-Match wrong etag ->", code(e))
    try:
        s3.put_object(Bucket=B, Key="a", Body=b"3", IfMatch=etag)
        print("PutObject If-Match right etag -> OK")
    except botocore.exceptions.ClientError as e:
        print("PutObject If-Match right etag ->", code(e))

    # 3. CompleteMultipartUpload If-None-Match: * (copy_if_not_exists=multipart path)
    def mpu_copy(dst, src="a"):
        up = s3.create_multipart_upload(Bucket=B, Key=dst)
        part = s3.upload_part_copy(Bucket=B, Key=dst, UploadId=up["UploadId"], PartNumber=1,
                                   CopySource={"Bucket": B, "Key": src})
        return s3.complete_multipart_upload(
            Bucket=B, Key=dst, UploadId=up["UploadId"], IfNoneMatch="*",
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["CopyPartResult"]["ETag"]}]})
    mpu_copy("b")
    print("CompleteMultipartUpload If-None-Match:* new key -> OK, content", s3.get_object(Bucket=B, Key="b")["Body"].read())
    s3.put_object(Bucket=B, Key="c", Body=b"other")
    try:
        mpu_copy("b", src="c")
        print("CompleteMultipartUpload If-None-Match:* on existing key -> SUCCEEDED (NOT emulated!)",
              s3.get_object(Bucket=B, Key="b")["Body"].read())
    except botocore.exceptions.ClientError as e:
        print("CompleteMultipartUpload If-None-Match:* on existing key ->", code(e),
              "content still", s3.get_object(Bucket=B, Key="b")["Body"].read())

    # 4. CopyObject with If-None-Match (not an S3 feature; object_store "header" copy mode would need it)
    try:
        s3.copy_object(Bucket=B, Key="b", CopySource={"Bucket": B, "Key": "c"},
                       # botocore has no IfNoneMatch param on CopyObject -> inject a header
                       )
        print("CopyObject unconditional overwrite -> OK (expected; CopyObject has no If-None-Match in S3)")
    except botocore.exceptions.ClientError as e:
        print("CopyObject ->", code(e))

# 5. Is moto's If-None-Match check ATOMIC under concurrent requests? (moto does get_object() then put:
#    a check-then-act in a threaded werkzeug server.) Race 4 threads on the same fresh key, many times.
import threading, boto3
from botocore.config import Config
TRIALS, THREADS = 150, 4
with moto_server() as (endpoint, s3, so, pid):
    clients = [boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1", config=Config(retries={"max_attempts": 0})) for _ in range(THREADS)]
    multi_winner = 0
    for t in range(TRIALS):
        wins, bar = [], threading.Barrier(THREADS)
        def go(i):
            bar.wait()
            try:
                clients[i].put_object(Bucket="delta", Key=f"race/{t}", Body=str(i).encode(), IfNoneMatch="*")
                wins.append(i)
            except botocore.exceptions.ClientError:
                pass
        ths = [threading.Thread(target=go, args=(i,)) for i in range(THREADS)]
        [x.start() for x in ths]; [x.join() for x in ths]
        if len(wins) != 1:
            multi_winner += 1
    print(f"moto atomicity stress: {TRIALS} trials x {THREADS} concurrent PutObject(If-None-Match:*) on one key -> "
          f"trials with !=1 winner: {multi_winner}")
