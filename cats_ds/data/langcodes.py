"""ISO 639-1 <-> ISO 639-3 for the languages the recipes use, so that a family map
(experts.families) or a group map (eval.groups) written with one kind of code serves a
corpus that uses the other: the shipped TED8 maps are 639-3 (`tur`, `por`), gettext and
OPUS-100 corpora are 639-1 (`tr`, `pt_BR`).

Coverage, on purpose a small table and not the whole standard: every 2-letter code in
the shipped family maps (cats_ds/model/families/*.yaml), which covers the 99 OPUS-100
languages, the gettext locales of the reference image, WMT10 and the TED8 languages
(tests/test_experts.py checks this). A 639-3 code is the T (terminology) code; the
bibliographic 639-2/B codes that differ (`fre`, `ger`, `cze` ...) are accepted as
aliases of it. Codes outside the table are matched exactly only. `sh` (Serbo-Croatian,
withdrawn from 639-1 but used by OPUS-100) maps to the macrolanguage `hbs`; `mo`
(Moldavian, withdrawn from both) is left out.
"""

from __future__ import annotations

import re
from typing import Optional

ISO_639_1_TO_3: dict[str, str] = dict(pair.split(":") for pair in """
ab:abk af:afr ak:aka am:amh an:arg ar:ara as:asm av:ava ay:aym az:aze ba:bak be:bel bg:bul bi:bis bn:ben
bo:bod br:bre bs:bos ca:cat ce:che ch:cha co:cos cs:ces cu:chu cv:chv cy:cym da:dan de:deu dv:div dz:dzo
ee:ewe el:ell en:eng eo:epo es:spa et:est eu:eus fa:fas ff:ful fi:fin fo:fao fr:fra fy:fry ga:gle gd:gla
gl:glg gn:grn gu:guj gv:glv ha:hau he:heb hi:hin hr:hrv ht:hat hu:hun hy:hye ia:ina id:ind ie:ile ig:ibo
io:ido is:isl it:ita iu:iku ja:jpn jv:jav ka:kat ki:kik kk:kaz kl:kal km:khm kn:kan ko:kor ks:kas ku:kur
kv:kom kw:cor ky:kir la:lat lb:ltz lg:lug li:lim ln:lin lo:lao lt:lit lv:lav mg:mlg mi:mri mk:mkd ml:mal
mn:mon mr:mar ms:msa mt:mlt my:mya na:nau nb:nob ne:nep nl:nld nn:nno no:nor nr:nbl nv:nav ny:nya oc:oci
om:orm or:ori os:oss pa:pan pi:pli pl:pol ps:pus pt:por qu:que rm:roh ro:ron ru:rus rw:kin sa:san sc:srd
sd:snd se:sme sh:hbs si:sin sk:slk sl:slv sm:smo sn:sna so:som sq:sqi sr:srp ss:ssw st:sot su:sun sv:swe
sw:swa ta:tam te:tel tg:tgk th:tha ti:tir tk:tuk tl:tgl tn:tsn to:ton tr:tur ts:tso tt:tat ug:uig uk:ukr
ur:urd uz:uzb ve:ven vi:vie vo:vol wa:wln wo:wol xh:xho yi:yid yo:yor zh:zho zu:zul
""".split())
"""ISO 639-1 -> ISO 639-3 (T code)."""

ISO_639_3_TO_1: dict[str, str] = {three: one for one, three in ISO_639_1_TO_3.items()}

ISO_639_2B_TO_3: dict[str, str] = dict(pair.split(":") for pair in """
alb:sqi arm:hye baq:eus bur:mya chi:zho cze:ces dut:nld fre:fra geo:kat ger:deu gre:ell ice:isl mac:mkd
mao:mri may:msa per:fas rum:ron slo:slk tib:bod wel:cym
""".split())
"""Bibliographic ISO 639-2/B codes -> the 639-3 (T) code of the same language."""


def to_639_3(code: str) -> Optional[str]:
    """The 639-3 code of a 639-1, 639-2/B or 639-3 code in the table (lower case), else None."""
    c = code.lower()
    if c in ISO_639_1_TO_3:
        return ISO_639_1_TO_3[c]
    if c in ISO_639_2B_TO_3:
        return ISO_639_2B_TO_3[c]
    return c if c in ISO_639_3_TO_1 else None


def to_639_1(code: str) -> Optional[str]:
    """The 639-1 code of a code in the table, else None."""
    three = to_639_3(code)
    return ISO_639_3_TO_1.get(three) if three else None


def equivalents(code: str) -> list[str]:
    """Other codes of the same language: its 639-1 and 639-3 codes (without `code` itself);
    [] for a code outside the table."""
    out = [c for c in (to_639_1(code), to_639_3(code)) if c and c != code]
    return list(dict.fromkeys(out))


def same_language(a: str, b: str) -> bool:
    """Whether two codes name the same language (equal, or 639-1/639-3/639-2B of one another)."""
    return a == b or (to_639_3(a) is not None and to_639_3(a) == to_639_3(b))


# language, then optional _REGION / -Script parts, .encoding and @modifier:
# pt_BR, zh_Hans, sr@latin, ca@valencia, de_DE.UTF-8, en@quot
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[_-][A-Za-z0-9]+)*(?:\.[A-Za-z0-9-]+)?(?:@[A-Za-z0-9]+)?")


def base_language(code: str) -> str:
    """The language part of a locale or mBART code (`pt_BR` -> `pt`); `code` itself when
    it has no region, script or modifier, or does not look like a locale at all."""
    m = _LOCALE.fullmatch(code)
    return m.group(1).lower() if m else code
