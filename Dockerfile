# Build the wheels in a throw-away stage so the final image carries no build tools.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels invite-worker==0.1.0 \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin invite \
    && mkdir /data \
    && chown invite /data
# Reports and inputs live on a mounted volume; the root filesystem can be read-only.
WORKDIR /data
USER 10001
ENTRYPOINT ["invite-worker"]
CMD ["--help"]
