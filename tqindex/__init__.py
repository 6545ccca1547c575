"""tqindex: an approximate nearest-neighbour index built on TurboQuant (Zandieh et al., ICLR 2026).

Zero training: a seeded random rotation makes every coordinate follow a known density, so one fixed
Lloyd-Max codebook quantizes any data. Search is asymmetric (full-precision queries against packed
codes), with optional full-precision rerank, and indexes persist as Arrow shards.
"""

from .codebook import CODEBOOK_VERSION, CODEBOOK_VERSIONS, lloyd_max_codebook
from .index import METRICS, Index, QuantizerOptions, SearchResult
from .native import get_num_threads, set_num_threads
from .quantizer import SCALE_DTYPES, VARIANTS, TurboQuantizer, bits_for_bytes
from .storage import FORMAT_VERSION, IndexFormatError, IndexLockedError

__version__ = "0.1.0"

__all__ = ["CODEBOOK_VERSION", "CODEBOOK_VERSIONS", "FORMAT_VERSION", "METRICS", "SCALE_DTYPES", "VARIANTS", "Index",
           "IndexFormatError", "IndexLockedError", "QuantizerOptions", "SearchResult", "TurboQuantizer", "bits_for_bytes",
           "get_num_threads", "lloyd_max_codebook", "set_num_threads", "__version__"]
