# The base image is pinned by digest (python 3.11.16-slim, the multi-platform index), so a
# re-pushed tag cannot change what is built. To renew it, read the current digest with
# `docker buildx imagetools inspect python:3.11-slim` and replace tag and digest together.
ARG PYTHON_IMAGE=python:3.11.16-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# The virtual environment is built in a throw-away stage; only the finished environment
# reaches the final image: no wheel files, no pip cache, no build tools in any layer.
FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/invite-worker
COPY pyproject.toml README.md /src/
COPY worker /src/worker
RUN /opt/invite-worker/bin/pip install --no-cache-dir --disable-pip-version-check /src

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/invite-worker/bin:$PATH
COPY --from=build /opt/invite-worker /opt/invite-worker
# /data is where inputs and reports live. It belongs to the non-root user, so a named
# volume mounted there starts out writable by it (Docker copies the ownership into a new
# volume); for a host directory or a Kubernetes volume see docs/operating.md ("In a container").
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin invite \
    && install -d -o 10001 -g 10001 -m 0700 /data
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
ENTRYPOINT ["invite-worker"]
CMD ["--help"]
