# wse_sync in a container: `wse-sync serve` of the echo example on port 4200.
#
#   docker build -t wse-sync .
#   docker run --rm -p 4200:4200 wse-sync
#   docker run --rm -p 4200:4200 -v "$PWD/app.py:/app/app.py:ro" wse-sync \
#       wse-sync serve app.py:server --host 0.0.0.0 --port 4200 --workers 4
#
# compose.yaml runs it as a CURVE broker and workers; docs/deploy.md.
# tests/processes/test_recipes.py checks every command line here against the CLI.

# -- build: the package and its dependencies into a venv -----------------------
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY wse_sync ./wse_sync
# gevent, pyzmq and ujson come as wheels for 3.12: no compiler needed
RUN /opt/venv/bin/pip install .

# -- run: the venv, the examples, a user without privileges -------------------
FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY examples ./examples
# uid 10001: compose.yaml's keys service gives the key files to it
RUN groupadd --system --gid 10001 wse && \
    useradd --system --uid 10001 --gid wse --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin wse
# numeric, so that an orchestrator can check it is not root
USER 10001:10001
EXPOSE 4200
# serve handles SIGTERM (closes the sockets with 1012, waits --grace for
# handlers, default 10 s): give `docker stop` more than that (-t 20)
STOPSIGNAL SIGTERM
CMD ["wse-sync", "serve", "examples/echo/app.py:server", "--host", "0.0.0.0", "--port", "4200"]
