"""Managed WAF rules of the L7 pipeline: our own rule format and rules.

    from agent.l7.waf import Waf, WafSettings
    waf = Waf(zone.waf)                        # compiled once per zone
    verdict = waf.inspect(method, target, headers, body)
    if verdict.blocked: ...                    # 403, count verdict.matches

  rules.yaml     the rules (format in rules.py): SQL injection, XSS, path
                 traversal and local files, remote file inclusion, command
                 injection, PHP, Java (JNDI, EL/OGNL, deserialization),
                 scanners, protocol anomalies
  rules.py       loads and checks the rules file once per process
  transforms.py  the named decodings a rule applies before its patterns
  inputs.py      a request split into collections (args, cookies, headers, ...),
                 with the bounds on how much of it is looked at
  prefilter.py   what each pattern needs (a character, a word) before it can
                 match, derived from the pattern itself
  engine.py      anomaly scoring: each matching rule adds its score, the
                 request is blocked at the zone's threshold; rules indexed
                 by their needs so that most never run on most values
  settings.py    per-zone settings: paranoia, threshold, exceptions
  corpus.py      the labelled request corpora that tune and measure the rules

Nothing here keeps or logs a request; a verdict names rules, categories and
targets ("args:q"), never what matched.
"""

from agent.l7.waf.corpus import CorpusEntry, CorpusError, load_corpora, load_corpus
from agent.l7.waf.engine import Match, Waf, WafVerdict
from agent.l7.waf.rules import CATEGORIES, RulesError, RuleSet, default_rules, load_rules
from agent.l7.waf.settings import WafException, WafSettings

__all__ = ["CATEGORIES", "CorpusEntry", "CorpusError", "Match", "RuleSet", "RulesError", "Waf",
           "WafException", "WafSettings", "WafVerdict", "default_rules", "load_corpora",
           "load_corpus", "load_rules"]
