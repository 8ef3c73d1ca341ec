# syntax=docker/dockerfile:1
# WSI DeepZoom tile server: FastAPI + OpenSlide under uvicorn, OpenSeadragon viewer.
#
#   docker build -t wsi-tileserver .
#   docker run --rm -p 5000:5000 -v /path/to/slides:/data:ro wsi-tileserver
#
# libopenslide comes from the openslide-bin wheel (a project dependency), not from apt.

# ---- viewer JavaScript: OpenSeadragon, exactly as pinned in package-lock.json --------------
FROM node:20-slim AS viewer
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --omit=peer --no-audit --no-fund --ignore-scripts --loglevel=error \
    && test -f node_modules/openseadragon/build/openseadragon/openseadragon.min.js \
    && test -d node_modules/openseadragon/build/openseadragon/images

# ---- Python: the project and its pinned dependencies in a self-contained venv --------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY app/ ./app/
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -c "import openslide; print('OpenSlide', openslide.__library_version__)"

# ---- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    SlideDirectory=/data \
    TileCachePath=/app/tile_cache

RUN groupadd --system --gid 10001 tileserver \
    && useradd --system --no-log-init --uid 10001 --gid tileserver \
        --home-dir /app --no-create-home --shell /usr/sbin/nologin tileserver

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=viewer /build/node_modules/openseadragon/build/openseadragon \
     /app/node_modules/openseadragon/build/openseadragon
COPY --from=viewer /build/node_modules/swagger-ui-dist /app/node_modules/swagger-ui-dist
COPY --from=viewer /build/node_modules/redoc/bundles /app/node_modules/redoc/bundles
COPY appsettings.json /app/appsettings.json
RUN mkdir -p /app/tile_cache /app/audit /data \
    && chown tileserver:tileserver /app/tile_cache /app/audit /data

USER 10001:10001
EXPOSE 5000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4).status != 200)"]
CMD ["tileserver", "serve", "--host", "0.0.0.0", "--port", "5000"]
