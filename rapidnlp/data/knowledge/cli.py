"""The knowledge options of `rapidnlp prepare`; light to import (the CLI parser loads it).

    rapidnlp prepare --demo --output data/demo/pd          # text dataset + PREFIX.knowledge/ (demo KG)
    rapidnlp prepare --demo --no-knowledge --output ...    # the text dataset only
    rapidnlp prepare --input corpus.txt --kg triples.tsv [--kg-aliases aliases.tsv]
                     [--kg-types types.tsv] [--workers N] --output data/my/prefix
"""
from __future__ import annotations

import argparse
from typing import Callable

from rapidnlp.errors import UserError


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--knowledge", action=argparse.BooleanOptionalAction, default=None,
                        help="also build PREFIX.knowledge/ (entity linking, mention tags, linked "
                             "triples, KG); on by default with --demo or --kg")
    parser.add_argument("--kg", help="knowledge triples TSV: subject<TAB>predicate<TAB>object")
    parser.add_argument("--kg-aliases", help="entity aliases TSV: entity<TAB>alias[<TAB>alias...]")
    parser.add_argument("--kg-types", help="entity types TSV: entity<TAB>type")
    parser.add_argument("--workers", type=int, default=1, help="entity-linking threads (0: all cores)")


def knowledge_step(args: argparse.Namespace, log: Callable[[str], None] = print):
    """None when no knowledge build is asked for; otherwise a function of the corpus path that
    builds PREFIX.knowledge/ once the tokenizer exists.  The knowledge graph is read (and bad
    options refused) here, before the text dataset is prepared."""
    wanted = args.knowledge if args.knowledge is not None else bool(args.demo or args.kg)
    if not wanted:
        if args.kg or args.kg_aliases or args.kg_types:
            raise UserError("prepare: --kg/--kg-aliases/--kg-types given with --no-knowledge; drop one")
        return None
    if args.workers < 0:
        raise UserError(f"prepare: --workers {args.workers}; give 0 (all cores) or more")
    if args.kg_aliases and not args.kg or args.kg_types and not args.kg:
        raise UserError("prepare: --kg-aliases/--kg-types need --kg TRIPLES.tsv")
    from rapidnlp.data.knowledge.build import prepare_knowledge
    from rapidnlp.data.knowledge.kg import KnowledgeGraph

    if args.kg:
        kg = KnowledgeGraph.read_tsv(args.kg, args.kg_aliases, args.kg_types)
        demo = False
    elif args.demo:
        from rapidnlp.data.knowledge.demo import demo_knowledge_graph

        kg = demo_knowledge_graph()
        log(f"demo knowledge graph (addressparser pca.csv places, jieba named entities): {kg}")
        demo = True
    else:
        raise UserError("prepare --knowledge: give --kg TRIPLES.tsv (and optionally --kg-aliases, "
                        "--kg-types), or use --demo")

    def run(corpus_path: str) -> dict:
        return prepare_knowledge(corpus_path, args.output, kg, tokenizer_path=args.output + ".model",
                                 workers=args.workers, strict_utf8=args.strict_utf8,
                                 evaluate_demo=demo, log=log)

    return run
