"""tools/activations.py: what the compiled backward of one block keeps, per token, on the CPU."""
import model
from tools import activations


def total(kept) -> int:
    return sum(per_token for *_, per_token in kept)


def test_the_census_counts_per_token_follows_the_budget_and_restores_the_model():
    full = activations.main(["--preset", "tiny", "--tokens", "256"])
    assert model.attend is not activations.stand_in_attend  # FlexAttention's attend is back for the other tests
    assert total(activations.main(["--preset", "tiny", "--tokens", "512"])[False]) == total(full[False])
    assert total(activations.main(["--preset", "tiny", "--tokens", "256", "--activation_memory", "0.3"])[False]) < \
        total(full[False])
    # tiny's MLP is 128 wide: the bfloat16 ReLU output, 256 bytes a token, is kept, and q and k's product
    # (2 x 64 wide) is one tensor, however many views of it the backward reads
    assert ("relu", (256, 128), 256) in full[False] and ("mm", (256, 128), 256) in full[False]
    # a block with a value embedding also keeps that embedding and the mixed v
    assert total(full[True]) == total(full[False]) + 2 * 128
