# The CIFAR-10 ResNet56 service. `docker compose up` builds and runs it (docker-compose.yml).
#
# Layout: the code and the shipped weights live in /app and the server runs from there
# (`python -m service`), so `weights/resnet56.safetensors` resolves against /app exactly as it
# does against a checkout. The project itself is not pip-installed; only its dependencies are,
# in a layer of their own before the code, so a change to the code or the weights rebuilds in
# seconds on top of the cached multi-GB dependency layer.
#
# torch comes from PyPI: on x86_64 that wheel carries CUDA, so the same image runs on a GPU
# host (with the NVIDIA Container Toolkit) and on a CPU-only one.

# The dependency list, read from pyproject.toml in a stage of its own: the install layer
# below is keyed on the list alone, so editing pyproject's tool settings or version does not
# reinstall the dependencies.
FROM python:3.11-slim AS requirements
COPY pyproject.toml /
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /requirements.txt

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN useradd --create-home --uid 10001 --user-group app
WORKDIR /app

# 1. Dependencies only, in their own layer, before any code. Every dependency ships as a
#    wheel (--only-binary), so no compiler is needed; PIP_NO_CACHE_DIR leaves no pip cache.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install --only-binary=:all: -r /tmp/requirements.txt && rm /tmp/requirements.txt

# 2. The code and the weights (see .dockerignore for what the build context holds), owned by
#    root and read-only to the server: made world-readable whatever their mode in the build
#    context (safetensors writes 0600), and byte-compiled here since the server cannot write.
COPY model/ model/
COPY service/ service/
COPY weights/ weights/
RUN chmod -R a+rX /app && python -m compileall -q model service

# The server's only writable place is its home (exported engine models are cached there).
USER app
ENV HOME=/home/app

EXPOSE 8000

# 200 only when the model is loaded and warmed up; urlopen raises (exit 1) on 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM itself, then drains in-flight requests.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
