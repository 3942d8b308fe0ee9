# The metering worker image (used by docker-compose.yml's `worker` service).
#
# Every runtime dependency ships as a manylinux wheel for CPython 3.11, so the slim image needs
# no compiler. The editable install keeps the repository's data files (avro/, data/) where the
# code expects them.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, pinned by constraints.txt, so code edits do not reinstall them.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt
RUN pip install -c constraints.txt -r /tmp/requirements.txt

COPY . .
RUN pip install -c constraints.txt --no-deps -e . \
    && useradd --create-home --uid 10001 metering \
    && mkdir -p /data \
    && chown metering /data

USER metering
# Faust's RocksDB tables and any local state live here (a volume in docker-compose.yml).
ENV METERING_DATA_DIR=/data
VOLUME ["/data"]

CMD ["metering", "worker"]
