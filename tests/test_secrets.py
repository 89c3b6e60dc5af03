"""Secrets never leak, and TLS is verified unless the user explicitly, loudly, turns it off.

Recognisable token, IAM password, AK and SK values (right ones and wrong ones) go through real
collections against the simulator -- token, IAM and AK/SK auth, with failures: refused
credentials, an expired token renewed at IAM, a bad signature, a proxy error page -- with DEBUG
logging on.  Then every channel is searched for them: stdout, stderr, log records (with
tracebacks), exception messages and reprs (with their chained causes), the reprs of the auth,
client and target objects, the Parquet history (decoded, not just its compressed bytes) and
CSV/Parquet exports.  (The dashboard's HTML is checked by the dashboard's own tests.)

TLS: against an HTTPS endpoint on loopback with a certificate from a private CA made here,
verification is on by default (a clear CONNECTION error row, not retried), ``--ca-bundle``
makes it pass, and ``--insecure`` or ``verify = false`` work only with a warning on stderr.
"""
from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import logging
import ssl
import threading
import traceback
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from roma_analytics.auth import AkSkAuth, IamPasswordAuth, TokenAuth
from roma_analytics.cli import main
from roma_analytics.client import RomaClient
from roma_analytics.errors import RomaError
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.targets import load_targets

TOKEN = "tok-SECRET-5f9e2a71c4"
PASSWORD = "pw-SECRET-83b1d0e6"
AK = "AKSECRET7Q3W9E1R5T"
SK = "sk-SECRET-c2d94e7a10"
WRONG = {"ROMA_TOKEN": "tok-WRONG-1a2b3c4d5e", "ROMA_PASSWORD": "pw-WRONG-6f7a8b9c",
         "ROMA_AK": "AKWRONG2Z4X6C8V0B1", "ROMA_SK": "sk-WRONG-0d1e2f3a4b"}
SECRETS = (TOKEN, PASSWORD, AK, SK, *WRONG.values())


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def decoded_files(root: Path) -> str:
    """Every file under ``root`` as text: raw bytes, and Parquet decoded (its pages are compressed)."""
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts.append(path.read_bytes().decode("latin-1"))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            parts.append(table.to_pandas().astype(str).to_csv())
            parts.append(str(table.schema.metadata))
    return "\n".join(parts)


@pytest.fixture
def secure_sim():
    with Simulator(projects=3, instances=3, seed=9, token=TOKEN, ak=AK, sk=SK, iam_password=PASSWORD) as sim:
        yield sim


def write_targets(path: Path, sim: Simulator, extra: str = "") -> Path:
    token_p, iam_p, aksk_p = sim.project_ids
    path.write_text(f"""
[defaults]
retries = 1
timeout = 2
{extra}
[[endpoints]]
endpoint = "{sim.base_url}"
  [[endpoints.projects]]
  project_id = "{token_p}"
  discover = true
  auth = {{ type = "token", token_env = "ROMA_TOKEN" }}
  [[endpoints.projects]]
  project_id = "{iam_p}"
  discover = true
  auth = {{ type = "iam", user_env = "ROMA_USER", password_env = "ROMA_PASSWORD", domain_env = "ROMA_DOMAIN", iam_endpoint = "{sim.base_url}" }}
  [[endpoints.projects]]
  project_id = "{aksk_p}"
  discover = true
  auth = {{ type = "aksk", ak_env = "ROMA_AK", sk_env = "ROMA_SK" }}
""", encoding="utf-8")
    return path


def test_no_secret_in_any_channel(secure_sim, tmp_path, capsys, caplog, monkeypatch):
    sim = secure_sim
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ROMA_USER", "analyst")
    monkeypatch.setenv("ROMA_DOMAIN", "acme")
    targets = write_targets(tmp_path / "targets.toml", sim)
    history = tmp_path / "history"
    outputs = []

    # 1. Right credentials, with faults: a 401 signature, an expired token renewed at IAM, a proxy page.
    for name, value in (("ROMA_TOKEN", TOKEN), ("ROMA_PASSWORD", PASSWORD), ("ROMA_AK", AK), ("ROMA_SK", SK)):
        monkeypatch.setenv(name, value)
    token_p, iam_p, aksk_p = sim.project_ids
    sim.set_fault(sim.instances(token_p)[0]["id"], "http_502_html")
    sim.set_fault(sim.instances(iam_p)[0]["id"], "auth_401_token_expired", times=1)
    sim.set_fault(sim.instances(aksk_p)[0]["id"], "auth_401_signature")
    assert main(["-v", "collect", "--config", str(targets), "--history", str(history)]) == 3
    outputs.append(capsys.readouterr())
    stored = HistoryStore(history).load()
    assert set(stored["project_id"]) == set(sim.project_ids), "all three auth kinds collected something"

    # 2. Wrong credentials everywhere: 401s from the gateway and from IAM.
    sim.clear_faults()
    for name, value in WRONG.items():
        monkeypatch.setenv(name, value)
    assert main(["-v", "collect", "--config", str(targets), "--history", str(history), "--json"]) == 4
    outputs.append(capsys.readouterr())
    errors = HistoryStore(history).load(table="errors")
    assert {"APIGW.0301"} <= set(errors["error_code"]) and (errors["http_status"] == 401).any()

    # 3. The token from --token-env on the command line path, wrong, and exports of both tables.
    monkeypatch.setenv("ROMA_AUTH_TOKEN", WRONG["ROMA_TOKEN"])
    assert main(["-v", "collect", "--endpoint", sim.base_url, "--project-id", token_p,
                 "--history", str(history), "--retries", "0"]) == 4
    exports = tmp_path / "exports"
    exports.mkdir()
    for table in ("stats", "errors"):
        for fmt in ("csv", "parquet"):
            assert main(["export", "--format", fmt, "--table", table, "--history", str(history),
                         "--out", str(exports / f"{table}.{fmt}")]) == 0
    outputs.append(capsys.readouterr())

    for captured in outputs:
        assert not leaks(captured.out), leaks(captured.out)
        assert not leaks(captured.err), leaks(captured.err)
    assert "DEBUG" in outputs[0].err, "-v should have logged at DEBUG"
    log_text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert not leaks(log_text), leaks(log_text)
    assert not leaks(decoded_files(history)), "a secret is in the history"
    assert not leaks(decoded_files(exports)), "a secret is in an export"


def test_no_secret_in_exceptions_and_reprs(secure_sim, tmp_path, monkeypatch):
    sim = secure_sim
    project = sim.project_ids[0]
    instance = sim.instances(project)[0]["id"]
    texts = []
    auths = [TokenAuth(TOKEN), TokenAuth(WRONG["ROMA_TOKEN"]), AkSkAuth(AK, SK, project_id=project),
             AkSkAuth(WRONG["ROMA_AK"], WRONG["ROMA_SK"], security_token=TOKEN),
             IamPasswordAuth("analyst", PASSWORD, "acme", project_id=project, iam_endpoint=sim.base_url),
             IamPasswordAuth("analyst", WRONG["ROMA_PASSWORD"], "acme", project_id=project,
                             iam_endpoint=sim.base_url)]
    for auth in auths:
        texts.append(repr(auth) + str(auth))
        with RomaClient(sim.base_url, auth=auth, retries=0) as client:
            texts.append(repr(client))
            try:
                client.task_statistics(project, instance)
            except RomaError as exc:
                texts.append(exception_text(exc))
    # A secret with a newline (a copy-paste accident) must not be echoed by the error either.
    for bad in (TOKEN + "\nX-Other: 1", " " + TOKEN + "\r\nX: y"):
        with pytest.raises(RomaError) as caught:
            TokenAuth(bad)
        texts.append(exception_text(caught.value))
    # An endpoint with user:password@ is refused without echoing the password.
    with pytest.raises(RomaError) as caught:
        RomaClient(f"http://analyst:{PASSWORD}@127.0.0.1:1")
    texts.append(exception_text(caught.value))
    # Targets and the loaded file: the reprs hold no credential.
    for name, value in (("ROMA_TOKEN", TOKEN), ("ROMA_PASSWORD", PASSWORD), ("ROMA_AK", AK), ("ROMA_SK", SK),
                        ("ROMA_USER", "analyst"), ("ROMA_DOMAIN", "acme")):
        monkeypatch.setenv(name, value)
    loaded = load_targets(write_targets(tmp_path / "t.toml", sim))
    texts.append(repr(loaded))
    texts += [repr(target) for target in loaded.targets]
    # A secret value written into the targets file is refused without being echoed.
    (tmp_path / "bad.toml").write_text(f'[[endpoints]]\nregion = "cn-north-4"\n'
                                       f'auth = {{ type = "token", token = "{TOKEN}" }}\n')
    with pytest.raises(RomaError) as caught:
        load_targets(tmp_path / "bad.toml")
    texts.append(exception_text(caught.value))
    joined = "\n".join(texts)
    assert not leaks(joined), leaks(joined)
    assert "APIGW.0301" in joined, "the wrong credentials should have been refused"


# --------------------------------------------------------------------------------------------
# TLS

STATS_BODY = {"common_task_details": {"running_tasks_count": 7, "abnormal_tasks_count": 2,
                                      "terminated_tasks_count": 1, "completed_tasks_count": 40},
              "cdc_task_details": {"running_tasks_count": 3, "abnormal_tasks_count": 0,
                                   "terminated_tasks_count": 0, "completed_tasks_count": 5}}


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca: bool, issuer_cert=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = (builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                               critical=False))
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "roma-analytics test CA")])
    ca_cert = build(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key.public_key(),
                 ca_key, ca=False, issuer_cert=ca_cert)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class _StatsHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server spelling
        body = json.dumps(STATS_BODY).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def https_endpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_ca_and_server_cert(folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatsHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca
    server.shutdown()
    server.server_close()


def collect_https(url: str, history: Path, *flags: str) -> int:
    return main(["collect", "--endpoint", url, "--project-id", "p-1", "--instance-id", "i-1",
                 "--history", str(history), "--retries", "2", *flags])


@pytest.fixture
def no_ca_environment(monkeypatch):
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "ROMA_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_verification_is_on_by_default(https_endpoint, tmp_path, capsys, no_ca_environment):
    url, _ = https_endpoint
    assert RomaClient(url).verify is True
    assert collect_https(url, tmp_path / "h") == 4
    err = capsys.readouterr().err
    assert "NOT verified" not in err
    row = HistoryStore(tmp_path / "h").load(table="errors").iloc[0]
    assert row["error_code"] == "CONNECTION" and pd.isna(row["http_status"])
    assert row["attempts"] == 1, "a certificate failure is not retried"
    assert "TLS" in row["error_msg"] and "certificate" in row["error_msg"].lower(), row["error_msg"]


def test_a_ca_bundle_makes_verification_pass(https_endpoint, tmp_path, capsys, no_ca_environment):
    url, ca = https_endpoint
    assert collect_https(url, tmp_path / "h", "--ca-bundle", str(ca)) == 0
    assert "NOT verified" not in capsys.readouterr().err
    stats = HistoryStore(tmp_path / "h").load().set_index("task_type")
    assert stats.loc["common", ["running", "abnormal", "terminated", "completed", "total"]].tolist() == [7, 2, 1, 40, 50]
    assert stats.loc["cdc", "total"] == 8


def test_insecure_needs_the_flag_and_warns(https_endpoint, tmp_path, capsys, no_ca_environment):
    url, _ = https_endpoint
    assert collect_https(url, tmp_path / "h", "--insecure") == 0
    err = capsys.readouterr().err
    assert "--insecure: TLS certificates are NOT verified" in err
    assert "InsecureRequestWarning" not in err, "one warning, not one per request"


def test_verify_false_in_a_targets_file_also_warns(https_endpoint, tmp_path, capsys, no_ca_environment):
    url, _ = https_endpoint
    targets = tmp_path / "targets.toml"
    targets.write_text(f'[defaults]\nverify = false\nretries = 0\n[[endpoints]]\nendpoint = "{url}"\n'
                       '  [[endpoints.projects]]\n  project_id = "p-1"\n  instances = ["i-1"]\n')
    assert main(["collect", "--config", str(targets), "--history", str(tmp_path / "h")]) == 0
    assert "verify = false in the targets file: TLS certificates are NOT verified" in capsys.readouterr().err
