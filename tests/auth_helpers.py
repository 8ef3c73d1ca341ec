"""Real credentials for the access-control tests: RSA keys (cryptography), tokens signed with
PyJWT, a JWKS served by a loopback HTTP server, forged tokens (``alg: none``, HS256 signed with
the public key)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.test/realms/wsi"
AUDIENCE = "tileserver"
ADMIN_KEY = "admin-key-0123456789abcdef"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    """An RSA key pair with a kid: signs tokens, gives its public JWK."""

    def __init__(self, kid: str):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def token(self, now: float, **claims) -> str:
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": int(now),
                   "exp": int(now) + 600, "roles": ["viewer"], **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid})

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def unsigned_token(now: float, kid: str, **claims) -> str:
    """``alg: none``: no signature at all."""
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory",
                              "exp": int(now) + 600, "roles": ["admin"], **claims}).encode())
    return f"{header}.{payload}."


def hs256_with_public_key(now: float, signer: Signer) -> str:
    """The algorithm-confusion forgery: HS256 whose HMAC key is the RSA public key's PEM."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory",
                              "exp": int(now) + 600, "roles": ["admin"]}).encode())
    mac = hmac.new(signer.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{b64(mac.digest())}"


class JwksServer:
    """A loopback HTTP server answering ``GET /jwks`` with the JWKS of ``signers`` (mutable:
    replace ``signers`` to rotate keys); counts the fetches."""

    def __init__(self, *signers: Signer):
        self.signers = list(signers)
        self.fetches = 0
        self.delay = 0.0
        """Seconds each answer waits (a slow identity provider)."""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.fetches += 1
                time.sleep(outer.delay)
                body = json.dumps({"keys": [s.jwk() for s in outer.signers]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Clock:
    """A frozen clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


def auth_settings(jwks_url: str, key_file: str, key_env: str = "TEST_ADMIN_KEY") -> dict:
    """The ``Auth`` section of the tests: API keys, JWT against ``jwks_url``, signed URLs."""
    return {
        "Mode": "apikey,jwt",
        "AdminApiKeys": [{"Id": "ops", "Environment": key_env}],
        "Jwt": {"JwksUrl": jwks_url, "Issuer": ISSUER, "Audience": AUDIENCE,
                "SlideGrants": {"pathologist": ["*"]}},
        "SignedUrls": {"KeyFile": key_file},
    }
