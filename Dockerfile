# The collector image: `roma-analytics collect --every`, without the dashboard extra (no streamlit,
# no plotly), running as an unprivileged user, the history in a volume.
#
#   docker build -t roma-collector .
#   docker run -d --name roma-collector \
#       -v roma-history:/data/history \
#       -v "$PWD/targets.toml:/etc/roma/targets.toml:ro" \
#       --env-file credentials.env \
#       roma-collector                               # collects every 5 minutes
#   docker run --rm -v roma-history:/data/history roma-collector --help
#
# credentials.env holds ROMA_AUTH_TOKEN=... (or ROMA_AK/ROMA_SK, or ROMA_IAM_*), or the variables
# the targets file names.  The history is /data/history (ROMA_HISTORY): read it with
# `roma-analytics dashboard --history` on a copy, or export from another container on the volume.
# `docker stop` sends SIGTERM: between runs the collector exits 0; during a run it abandons that
# run (nothing of it is written) and exits 0.  tests/test_dockerfile.py runs these steps in a venv.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . /src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin roma \
    && mkdir -p /data/history && chown -R roma /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/roma_analytics-*.whl && rm -rf /wheels
USER roma
WORKDIR /data
ENV ROMA_HISTORY=/data/history PYTHONUNBUFFERED=1
VOLUME ["/data/history"]
ENTRYPOINT ["roma-analytics", "collect"]
CMD ["--config", "/etc/roma/targets.toml", "--every", "5m"]
