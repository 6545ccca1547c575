"""Framework adapters, each behind its own extra and imported only when used:

- `tqindex.integrations.langchain`: `TQIndexVectorStore`, a LangChain `VectorStore` (``pip install
  'tqindex[langchain]'``).
- `tqindex.integrations.llama_index`: `TQIndexVectorStore`, a LlamaIndex vector store (``pip install
  'tqindex[llama-index]'``).

`tqindex.integrations.documents` holds what both share: string ids over the index's int64 ids, the
payload columns a document is stored in, and metadata filters as Arrow expressions.
"""
