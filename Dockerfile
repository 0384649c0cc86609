# docker build -t plmrun .
# docker run --gpus all --shm-size 16g --rm -v $PWD/shards:/shards -e DATA=/shards/sp2014 \
#     -v $PWD/logs:/plmrun/logs -v $PWD/checkpoints:/plmrun/checkpoints plmrun [train.py flags]
# (DATA is a folder inside the mount: data/prepare.py swaps a finished build in by renaming, which a mount point
# refuses. Build sp2014's shards on the host first, `python data/sp2014.py --out shards/sp2014`: its recipe needs
# Debian's metastudent-data package, which this Ubuntu-based image may not offer.)
# (--shm-size: the loader's worker processes hand batches over through shared memory)
# The devel image: torch.compile's Triton kernels need a C compiler at run time.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel
WORKDIR /plmrun
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENTRYPOINT ["bash", "run.sh"]
