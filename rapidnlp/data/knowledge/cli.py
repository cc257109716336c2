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


def knowledge_step(args: argparse.Namespace, log: Callable[[str], None] = print):
    """None when no knowledge build is asked for; otherwise (knowledge graph, whether it is the
    demo's).  The knowledge graph is read (and bad options refused) here, before any work."""
    wanted = args.knowledge if args.knowledge is not None else bool(args.demo or args.kg)
    if not wanted:
        if args.kg or args.kg_aliases or args.kg_types:
            raise UserError("prepare: --kg/--kg-aliases/--kg-types given with --no-knowledge; drop one")
        return None
    if args.kg_aliases and not args.kg or args.kg_types and not args.kg:
        raise UserError("prepare: --kg-aliases/--kg-types need --kg TRIPLES.tsv")
    from rapidnlp.data.knowledge.kg import KnowledgeGraph

    if args.kg:
        return KnowledgeGraph.read_tsv(args.kg, args.kg_aliases, args.kg_types), False
    if args.demo:
        from rapidnlp.data.knowledge.demo import demo_knowledge_graph

        kg = demo_knowledge_graph()
        log(f"demo knowledge graph (addressparser pca.csv places, jieba named entities): {kg}")
        return kg, True
    raise UserError("prepare --knowledge: give --kg TRIPLES.tsv (and optionally --kg-aliases, "
                    "--kg-types), or use --demo")
