# Sourced by the GPU scripts (repo root, .whl carried): installs into /tmp/site only what the GPU machine lacks of
# diffusers / jsonargparse / datasets (their wheels in .whl), so nothing of its own (numpy, torch, ...) is
# shadowed, lays hqdm out as the wheel does (trainers/ and data/ become hqdm.trainers and hqdm.data) and defines
# `hqdm` as the console script.
mkdir -p /tmp/site
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
for pair in diffusers:diffusers jsonargparse:jsonargparse docstring_parser:docstring_parser \
            typeshed_client:typeshed_client importlib_metadata:importlib_metadata datasets:datasets dill:dill \
            multiprocess:multiprocess; do
  mod=${pair%%:*}; whl=${pair##*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
      --upgrade --target /tmp/site .whl/${whl}-*.whl
done
ln -sfn ../trainers hqdm/trainers && ln -sfn ../data hqdm/data
export PYTHONPATH=$PWD:/tmp/site
hqdm() { python3 -c "import sys; from hqdm.trainers.cli import main; sys.argv[0] = 'hqdm'; main()" "$@"; }
