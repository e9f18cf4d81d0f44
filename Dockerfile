# One image for every Python process (orders API, relay, consumers, hello publisher);
# compose picks the process with `command:`.
#
# Dependencies come only from requirements.lock: exact versions with their sha256
# hashes (pip refuses anything else), regenerated with `make lock`. The project itself
# is installed on top without dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY messaging ./messaging
COPY orders ./orders
COPY consumers ./consumers
COPY hello ./hello
COPY ops ./ops
COPY devtools ./devtools
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 app
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER app
WORKDIR /home/app
CMD ["hello-publisher"]
