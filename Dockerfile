# docker build -t plmrun .
# docker run --gpus all --shm-size 16g --rm -v $PWD/data:/plmrun/data -v $PWD/logs:/plmrun/logs \
#     -v /path/to/shared:/shared -e SOURCE=/shared/data plmrun
# (--shm-size: the loader's worker processes hand batches over through shared memory)
# The devel image: torch.compile's Triton kernels need a C compiler at run time.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel
WORKDIR /plmrun
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENTRYPOINT ["bash", "run.sh"]
