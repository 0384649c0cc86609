"""tools/activations.py: what the compiled backward of one block keeps, per token, on the CPU as on the GPU."""
import model
from tools import activations


def total(kept) -> int:
    return sum(per_token for *_, per_token in kept)


def test_the_census_counts_per_token_follows_the_budget_and_restores_the_model():
    full = activations.main(["--preset", "tiny", "--tokens", "256"])
    for name, stand_in in activations.STAND_INS.items():  # FlexAttention and the ops are back for the other tests
        assert getattr(model, name) is not stand_in, name
    assert total(activations.main(["--preset", "tiny", "--tokens", "512"])[False]) == total(full[False])
    assert total(activations.main(["--preset", "tiny", "--tokens", "256", "--activation_memory", "0.3"])[False]) < \
        total(full[False])
    # as on the GPU: the MLP op keeps h = relu(a)² (tiny's MLP is 128 wide: 256 bytes a token in bfloat16), not the
    # ReLU's output nor a matmul's; the QK-norm op keeps q and k after it, not their product before (2 x 64 wide)
    kept = {(op, shape) for op, shape, _ in full[False]}
    assert ("pow", (256, 128)) in kept and ("relu", (256, 128)) not in kept and ("mm", (256, 128)) not in kept
    assert sum(shape == (256, 2, 32) for _, shape, _ in full[False]) == 2  # q and k after norm and rotary
    # a block with a value embedding also keeps the one-hot rows it looks its table up in (40 columns of bfloat16),
    # and neither the embedding nor v before the mix
    assert total(full[True]) == total(full[False]) + 80
