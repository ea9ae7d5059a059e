"""Fill in the middle's prompt (server/fill_in_middle.py) for tokenizers the embedded models do not
have: one that puts BOS (and EOS) around a text, and vocabularies spelling the FIM tokens each way.
The served path is tested end to end on the tests' GGUFs (tests/test_architectures.py)."""
from server.fill_in_middle import SPELLINGS, fim_ends, fim_prompt, fim_tokens, leading_specials


class Tok:
    """A stand-in: `vocab` maps spellings to ids; text encodes to one id per character (100 + its
    code), with `around` put before and after it when special tokens are asked for."""

    def __init__(self, vocab: dict[str, int], around: tuple[list[int], list[int]] = ([], [])):
        self.vocab, self.around = vocab, around

    def token_id(self, text):
        return self.vocab.get(text)

    def encode(self, text, add_special_tokens=True):
        ids = [100 + ord(c) for c in text]
        return [*self.around[0], *ids, *self.around[1]] if add_special_tokens else ids


def test_only_the_specials_before_a_text_lead_the_prompt():
    assert leading_specials(Tok({}, ([1], [2]))) == [1]  # "<s> $A </s>": BOS, not EOS
    assert leading_specials(Tok({}, ([1], []))) == [1] and leading_specials(Tok({})) == []
    tokens = (5, 6, 7)
    assert fim_prompt([1], tokens, [8, 9], [10]) == [1, 5, 8, 9, 6, 10, 7]


def test_each_spelling_is_found_and_the_first_the_vocabulary_has_whole_wins():
    for i, spelling in enumerate(SPELLINGS):
        vocab = {text: 10 * i + j for j, text in enumerate(spelling)}
        assert fim_tokens(Tok(vocab)) == (10 * i, 10 * i + 1, 10 * i + 2)
    partial = {"<|fim_prefix|>": 1, "<|fim_suffix|>": 2, "<fim_prefix>": 3, "<fim_suffix>": 4, "<fim_middle>": 5}
    assert fim_tokens(Tok(partial)) == (3, 4, 5) and fim_tokens(Tok({})) is None
    assert fim_ends(Tok({"<EOT>": 9, "<|fim_pad|>": 8})) == [9, 8]
