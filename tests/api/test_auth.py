"""Access control through the app: real RSA keys, tokens signed with PyJWT, a JWKS served by a
loopback HTTP server, admin API keys, signed URLs under a frozen clock; every route family."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from app.server.app import create_app
from app.server.credentials import JwtVerifier
from app.settings import settings_from
from tests.auth_helpers import (
    ADMIN_KEY,
    Clock,
    JwksServer,
    Signer,
    auth_settings,
    hs256_with_public_key,
    unsigned_token,
)
from tests.conftest import decode, local_client

# every family a slide grant guards: tiles (slide, associated, single slide and its associated
# images), DZIs, documents, viewer pages
VIEW_FAMILIES = {
    "small": ["/storage/small_files/0/0_0.jpeg", "/storage/small.dzi", "/api/slides/small",
              "/api/slides/small/policy", "/slide/small.html",
              "/storage/small/associated/thumbnail_files/0/0_0.jpeg",
              "/storage/small/associated/thumbnail.dzi",
              "/api/slides/small/associated/thumbnail",
              "/slide/small/associated/thumbnail.html"],
    "image": ["/image_files/0/0_0.jpeg", "/image.dzi",
              "/image/associated/thumbnail_files/0/0_0.jpeg",
              "/image/associated/thumbnail.dzi", "/api/slides/image"],
}
ADMIN_ROUTES = [("GET", "/api/tiles/stats"), ("GET", "/api/jobs"),
                ("GET", "/api/tiles/small/stats")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, fixtures):
    tmp = tmp_path_factory.mktemp("auth")
    slides = tmp / "slides"
    slides.mkdir()
    for name in ("small.svs", "boxes.tiff"):
        shutil.copy(fixtures / name, slides / name)
    key_file = tmp / "url.key"
    key_file.write_text("k" * 48)
    first, second = Signer("k1"), Signer("k2")
    jwks = JwksServer(first)
    clock = Clock()
    settings = settings_from({
        "Image": {"Path": str(slides / "small.svs")},
        "Images": [{"Name": "small", "Path": str(slides / "small.svs")},
                   {"Name": "boxes", "Path": str(slides / "boxes.tiff")}],
        "TileCachePath": str(tmp / "cache"),
        "Auth": auth_settings(jwks.url, str(key_file)),
        "Audit": {"Enabled": True, "Path": str(tmp / "audit" / "tiles.jsonl")},
    })
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_ADMIN_KEY", ADMIN_KEY)
    client = local_client(create_app(settings, clock=clock))
    client.__enter__()
    yield {"client": client, "jwks": jwks, "clock": clock, "first": first, "second": second,
           "audit": tmp / "audit" / "tiles.jsonl"}
    client.__exit__(None, None, None)
    jwks.close()
    mp.undo()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_each_get_their_status_on_every_route_family(world):
    client, clock, first = world["client"], world["clock"], world["first"]
    now = clock.now
    good = first.token(now, slides=["small", "image"])
    invalid = {
        "expired": first.token(now - 4000, exp=int(now) - 3000),
        "not yet valid": first.token(now, nbf=int(now) + 3000),
        "wrong issuer": first.token(now, iss="https://evil.test"),
        "wrong audience": first.token(now, aud="someone-else"),
        "wrong key": Signer("k1").token(now),  # same kid, another key: bad signature
        "alg none": unsigned_token(now, "k1"),
        "HS256 with the public key": hs256_with_public_key(now, first),
        "garbage": "a.b.c",
    }
    urls = [u for family in VIEW_FAMILIES.values() for u in family]
    for url in urls:
        assert client.get(url, headers=bearer(good)).status_code == 200, url
        missing = client.get(url)
        assert missing.status_code == 401, url
        assert missing.headers["www-authenticate"] == 'Bearer realm="tileserver"'
        for why, token in invalid.items():
            r = client.get(url, headers=bearer(token))
            assert r.status_code == 401, (url, why, r.text)
            assert r.json()["error"] == "unauthorized"
            assert 'error="invalid_token"' in r.headers["www-authenticate"], (url, why)
    for method, url in ADMIN_ROUTES:
        assert client.request(method, url, headers=bearer(good)).status_code == 403, url
        assert client.request(method, url).status_code == 401
        assert client.request(method, url, headers={"X-Api-Key": ADMIN_KEY}).status_code == 200
        assert client.request(method, url, headers=bearer(ADMIN_KEY)).status_code == 200
    assert client.get("/api/jobs", headers={"X-Api-Key": "wrong-key-0123456789"}
                      ).status_code == 401


def test_grants_filter_listings_and_a_denied_slide_reads_as_a_missing_one(world):
    client, clock, first = world["client"], world["clock"], world["first"]
    only_small = bearer(first.token(clock.now, slides=["sm*"]))
    listing = client.get("/api/images", headers=only_small).json()
    assert [item["name"] for item in listing] == ["small"]
    index = client.get("/", headers=only_small).text
    assert "/slide/small.html" in index and "boxes" not in index
    for denied, missing in (("/storage/boxes.dzi", "/storage/nosuch.dzi"),
                            ("/api/slides/boxes", "/api/slides/nosuch"),
                            ("/storage/boxes_files/0/0_0.jpeg", "/storage/nosuch_files/0/0_0.jpeg"),
                            ("/storage/boxes_files/0/0_9.jpeg", "/storage/nosuch_files/0/0_9.jpeg"),
                            ("/storage/boxes_files/x/0_0.jpeg", "/storage/nosuch_files/x/0_0.jpeg"),
                            ("/slide/boxes.html", "/slide/nosuch.html")):
        a = client.get(denied, headers=only_small)
        b = client.get(missing, headers=only_small)
        assert a.status_code == b.status_code == 404, (denied, a.status_code, b.status_code)
        assert a.json() == json.loads(b.text.replace("nosuch", "boxes")), (a.text, b.text)
    # a role from a configured grant (Auth:Jwt:SlideGrants pathologist -> *)
    group = bearer(first.token(clock.now, roles=["viewer", "pathologist"]))
    assert len(client.get("/api/images", headers=group).json()) == 3
    # no role at all: valid but not enough
    assert client.get("/api/images", headers=bearer(first.token(clock.now, roles=[]))
                      ).status_code == 403


def test_key_rotation_is_followed_and_the_provider_is_not_flooded(world):
    client, clock, first, second, jwks = (world[k] for k in
                                          ("client", "clock", "first", "second", "jwks"))
    old = first.token(clock.now, slides=["small"])
    assert client.get("/api/slides/small", headers=bearer(old)).status_code == 200
    jwks.signers = [first, second]  # the provider publishes a new key
    new = second.token(clock.now, slides=["small"])
    fetches = jwks.fetches
    clock.now += 6  # past the refetch guard: an unknown kid fetches the key set again
    assert client.get("/api/slides/small", headers=bearer(new)).status_code == 200
    assert jwks.fetches == fetches + 1
    for _ in range(5):  # random kids within the guard: no fetch, 401
        forged = Signer("rand").token(clock.now)
        assert client.get("/api/slides/small", headers=bearer(forged)).status_code == 401
    assert jwks.fetches == fetches + 1
    for _ in range(3):  # a verified token is cached: no new verification, no fetch
        assert client.get("/storage/small_files/0/0_0.jpeg", headers=bearer(new)
                          ).status_code == 200
    jwks.signers = [first]


def test_requests_during_the_first_key_fetch_wait_for_it():
    """Tokens that come while the key set is being fetched the first time are verified
    once it is there (a slow provider), not refused for want of a key: one fetch."""
    signer = Signer("k1")
    jwks = JwksServer(signer)
    jwks.delay = 0.3
    try:
        settings = settings_from({"Auth": auth_settings(jwks.url, "")}).Auth.Jwt
        verifier = JwtVerifier(settings)
        now = time.time()
        tokens = [signer.token(now, sub=f"user{i}") for i in range(8)]

        async def verify_all():
            return await asyncio.gather(*(verifier.verify(t) for t in tokens))

        principals = asyncio.run(verify_all())
    finally:
        jwks.close()
    assert [p.subject for p in principals] == [f"user{i}" for i in range(8)]
    assert jwks.fetches == 1


def test_signed_urls(world):
    client, clock, first = world["client"], world["clock"], world["first"]
    viewer = bearer(first.token(clock.now, slides=["small"]))
    issued = client.get("/api/slides/small/token", headers=viewer,
                        params={"seconds": 60}).json()
    dzi_url, query = issued["dzi_url"], issued["query"]
    assert issued["expires"] == int(clock.now) + 60
    assert client.get(dzi_url).status_code == 200
    tile = client.get(f"/storage/small_files/0/0_0.jpeg?{query}")
    assert tile.status_code == 200 and decode(tile.content).shape[2] == 3
    page = client.get(issued["viewer_url"])
    assert page.status_code == 200 and 'data-dzi-url="/storage/small.dzi"' in page.text
    params = parse_qsl(query)
    reordered = urlencode(list(reversed(params)))
    assert client.get(f"/api/slides/small?{reordered}").status_code == 200
    # another slide with the same grant: as if it did not exist
    other = client.get(f"/api/slides/boxes?{query}")
    assert other.status_code == 404 and other.json()["error"] == "slide_not_found"
    tampered = [(k, ("boxes" if k == "grant" else v)) for k, v in params]
    forged_sig = [(k, (v[:-2] + ("AA" if v[-2:] != "AA" else "BB")) if k == "sig" else v)
                  for k, v in params]
    longer = [(k, str(int(v) + 3600) if k == "exp" else v) for k, v in params]
    doubled = [*params, ("grant", "*")]
    for bad in (tampered, forged_sig, longer, doubled):
        r = client.get(f"/api/slides/small?{urlencode(bad)}")
        assert r.status_code == 401, (bad, r.text)
        assert dict(params)["sig"] not in r.text  # no signature echoed back
    # a signed URL cannot sign URLs
    assert client.get(f"/api/slides/small/token?{query}").status_code == 403
    # the frozen clock passes the expiry
    clock.now += 61
    expired = client.get(f"/storage/small_files/0/0_0.jpeg?{query}")
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    assert urlsplit(dzi_url).path == "/storage/small.dzi"


def test_changes_of_state_need_an_admin_on_the_same_site_and_are_audited(world):
    client = world["client"]
    admin = {"X-Api-Key": ADMIN_KEY}
    cross = [{"Origin": "https://evil.test"}, {"Sec-Fetch-Site": "cross-site"},
             {"Origin": "null"}]
    for headers in cross:
        for method, url in (("POST", "/api/tiles/generate-all"), ("DELETE", "/api/tiles/cache"),
                            ("DELETE", "/api/jobs/nosuch")):
            r = client.request(method, url, headers={**admin, **headers})
            assert r.status_code == 403, (method, url, headers, r.text)
    assert client.get("/api/jobs", headers=admin).json() == []  # nothing started
    same = {**admin, "Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"}
    r = client.delete("/api/tiles/small/cache", headers=same)
    assert r.status_code == 200
    client.__exit__(None, None, None)  # flush the audit log
    client.__enter__()
    lines = [json.loads(x) for x in world["audit"].read_text().splitlines()]
    actions = [x for x in lines if x["kind"] == "action"]
    assert {(a["method"], a["route"], a["status"]) for a in actions} >= {
        ("POST", "/api/tiles/generate-all", 403), ("DELETE", "/api/tiles/cache", 403),
        ("DELETE", "/api/tiles/{name}/cache", 200)}
    done = [a for a in actions if a["route"] == "/api/tiles/{name}/cache"][0]
    assert done["subject"] == "apikey:ops" and done["auth"] == "apikey"
    issued = [a for a in actions if a["route"] == "/api/slides/{name}/token"]
    assert issued and issued[0]["subject"] == "alice" and issued[0]["status"] == 200
    tiles = [x for x in lines if x["kind"] == "tile" and x["status"] == 200]
    assert {t["subject"] for t in tiles} >= {"alice"} and {t["auth"] for t in tiles} >= {
        "jwt", "signed-url"}
    text = world["audit"].read_text()
    assert ADMIN_KEY not in text and "k" * 48 not in text  # no secret is ever written


PERMISSIONS = {
    ("GET", "/"): "list", ("GET", "/api/images"): "list",
    ("GET", "/slide/{name}.html"): "view",
    ("GET", "/slide/{name}/associated/{associated}.html"): "view",
    ("GET", "/slide/{name}/mirador.html"): "view",
    ("GET", "/iiif/3/{name}"): "view", ("GET", "/iiif/3/{name}/info.json"): "view",
    ("GET", "/iiif/3/{name}/associated/{associated}"): "view",
    ("GET", "/iiif/3/{name}/associated/{associated}/info.json"): "view",
    ("GET", "/iiif/3/{name}/manifest.json"): "view",
    ("GET", "/image.dzi"): "view", ("GET", "/storage/{name}.dzi"): "view",
    ("GET", "/storage/{name}/associated/{associated}.dzi"): "view",
    ("GET", "/image/associated/{associated}.dzi"): "view",
    ("GET", "/api/slides/{name}"): "view", ("GET", "/api/slides/{name}/policy"): "view",
    ("GET", "/api/slides/{name}/associated/{associated}"): "view",
    ("GET", "/api/slides/{name}/token"): "token",
    ("GET", "/api/tiles/stats"): "admin", ("GET", "/api/tiles/{name}/stats"): "admin",
    ("GET", "/api/jobs"): "admin", ("GET", "/api/jobs/{job_id}"): "admin",
    ("GET", "/api/jobs/{job_id}/events"): "admin",
    ("DELETE", "/api/tiles/cache"): "change", ("DELETE", "/api/tiles/{name}/cache"): "change",
    ("POST", "/api/tiles/generate"): "change", ("POST", "/api/tiles/generate-all"): "change",
    ("POST", "/api/tiles/{name}/generate"): "change", ("DELETE", "/api/jobs/{job_id}"): "change",
    ("GET", "/static/{file}"): "public", ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public", ("GET", "/metrics"): "admin",
    ("GET", "/api/version"): "public", ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public", ("GET", "/redoc"): "public",
}
EXAMPLE = {"name": "small", "associated": "thumbnail", "job_id": "nosuch", "file": "viewer.js",
           "level": "0", "tile": "0_0.jpeg", "region": "full", "size": "max", "rotation": "0",
           "quality": "default", "format": "jpg"}


def concrete(template: str) -> str:
    for key, value in EXAMPLE.items():
        template = template.replace("{" + key + "}", value)
    return template


def test_no_route_escapes(world):
    """Every route of the app, walked: each declares the permission of the table (a new
    route must be added to it), and without credentials each answers 401 unless public; every
    tile family of the tile route too."""
    from starlette.routing import Mount

    from app.server.app import app_routes
    from app.server.auth import GuardedRoute
    from app.server.tiles import openapi_paths

    client = world["client"]
    app = client.app
    seen = {}
    for route in app_routes(app):
        if isinstance(route, Mount):
            continue
        assert isinstance(route, GuardedRoute), route
        for method in route.methods:
            seen[(method, route.path)] = route.requirement.permission.value
    assert seen == PERMISSIONS
    for (method, path), permission in seen.items():
        if "{name}" in path or path.startswith(("/image.", "/image/")):
            assert permission in ("view", "token", "admin", "change"), path
        if method in ("POST", "DELETE"):
            assert permission == "change", path
        r = client.request(method, concrete(path))
        if permission == "public":
            assert r.status_code in (200, 404), (method, path, r.status_code)
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
    families = list(openapi_paths())
    assert len(families) >= 4
    for family in families:
        assert client.get(concrete(family)).status_code == 401, family
        signed_for_boxes = world["client"].get(concrete(family).replace("small", "boxes"))
        assert signed_for_boxes.status_code == 401
    for mount in [r for r in app_routes(app) if isinstance(r, Mount)]:
        assert mount.path.startswith("/static/")  # static assets only


def test_openapi_declares_the_schemes(world):
    doc = world["client"].get("/openapi.json").json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey", "signedUrl"}
    assert doc["servers"] == [{"url": "/"}]
    tiles = doc["paths"]["/storage/{name}_files/{level}/{tile}"]["get"]
    assert {"signedUrl": []} in tiles["security"] and "401" in tiles["responses"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert {"signedUrl": []} not in doc["paths"]["/api/jobs"]["get"]["security"]
