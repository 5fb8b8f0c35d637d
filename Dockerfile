# One image for the web processes and the GPU workers (compose.yaml). The plain torch requirement takes
# PyPI's CUDA build; for ROCm, install torch from local_packages/ first (README).
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
EXPOSE 5000
