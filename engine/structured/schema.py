"""A JSON schema compiled into the grammar the JSON machine (engine/structured/json_machine.py) runs.

The grammar is a table of nodes, each the set of values allowed at one place: an object (its
properties in the schema's order, required ones mandatory, or free keys whose values follow
`additionalProperties`), an array, a string, a number or integer, and literal JSON texts (true,
false, null, enum and const values). A union (`anyOf`, `oneOf`, a list of types) merges its branches
into one node. Object branches are told apart by a tag: the same required property in each, with
constant values (a pydantic union of models with a Literal field), written first; other unions the machine
could not tell apart by a value's first byte are refused, and so is a `oneOf` whose branches could
both match one value.

Strings may be held to a `pattern`, a known `format` (engine/structured/formats.py) and a length
(`minLength`, `maxLength`), run as an automaton over their characters (engine/structured/regex.py);
numbers to bounds (`minimum`, `maximum` and the exclusive ones) and `multipleOf`
(engine/structured/number_range.py).

Outputs always validate against the schema; some valid documents are never generated: properties
come in the schema's order, and an object with `properties` gets no others. Keywords that constrain
values in ways the grammar does not (`uniqueItems`, `patternProperties`, ...) are
refused with an error naming them, never ignored; a `format` not known here is an annotation, as
JSON Schema (2019-09 on) defines it.
"""
from __future__ import annotations

import json
import math
import secrets
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal

from engine.sampling_params import InvalidParamError
from engine.structured.formats import PATTERNS
from engine.structured.number_range import Range
from engine.structured.regex import Pattern, PatternError, Work

PARAM = "response_format"
MAX_NODES = 2000
# of unions, all told: a branch that is a $ref adds no node but is merged all the same, copying up to
# MAX_LITERALS values (at most 2,000 x 1,000 copies: 0.12 s measured, in a worker thread)
MAX_BRANCHES = 2000
NUMBER_BYTES = 24  # of one number
MAX_PREFIX_ITEMS = 256  # a tuple's positions (each one is counted in the array's state)
MAX_LITERALS = 1000  # enum and const values in one schema (OpenAI's strict mode allows 1,000 enum values)
# set by server/tool_calls.py on a non-strict tool's schemas: string and number keywords that do
# not compile are dropped there (in the thread that compiles), not refused. Its value is an object
# no JSON parses to (a client's own "x-skipserve-loose" is an annotation), written into the grammar
# cache's key as a text no client can guess.


class _LooseMark:
    text = f"non-strict tool {secrets.token_hex(16)}"


LOOSE = "x-skipserve-loose"
LOOSE_MARK = _LooseMark()


def schema_key(schema) -> str:
    """A schema's text, the loose mark included (the keys' order is the properties' order)."""
    def mark(value):
        if value is LOOSE_MARK:
            return LOOSE_MARK.text
        raise TypeError(f"{type(value).__name__} is not JSON")
    return json.dumps(schema, default=mark)
ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "discriminator", LOOSE))
# what strings and numbers are held to, beside their type
VALUE_KEYWORDS = frozenset(("pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
                            "exclusiveMaximum", "multipleOf"))
KEYWORDS = frozenset(("type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
                      "maxItems",
                      "enum", "const", "anyOf", "oneOf", "allOf", "$ref")) | VALUE_KEYWORDS | ANNOTATIONS
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


@dataclass(frozen=True)
class Property:
    key: bytes  # the key as JSON text, quotes included
    node: int
    required: bool


@dataclass(frozen=True)
class ObjectSpec:
    properties: tuple[Property, ...] = ()
    additional: int | None = None  # node of free keys' values (used when there are no properties)
    # a tagged union: its one property is the tag; the node whose object the rest follows, by the tag's
    # literal (in the order of the tag node's literals)
    variants: tuple[int, ...] = ()

    def keys_from(self, index: int) -> tuple[tuple[bytes, ...], tuple[int, ...]] | None:
        """The keys that may come next, when the keys before `index` are done: each optional one up
        to the first required one (which may not be passed over)."""
        names, indexes = [], []
        for i in range(index, len(self.properties)):
            names.append(self.properties[i].key)
            indexes.append(i)
            if self.properties[i].required:
                break
        return (tuple(names), tuple(indexes)) if names else None

    def required_from(self, index: int) -> bool:
        return any(p.required for p in self.properties[index:])


@dataclass(frozen=True)
class ArraySpec:
    items: int | None  # node of the items after the prefix (None: there are none; max_items says so too)
    min_items: int = 0
    max_items: int | None = None
    prefix: tuple[int, ...] = ()  # a tuple's (`prefixItems`) nodes of its first items, in order

    def item(self, index: int) -> int:
        """The node of the item at `index` (the array holds more than `index` items)."""
        return self.prefix[index] if index < len(self.prefix) else self.items

    @property
    def count_cap(self) -> int:
        """Items counted up to this: past both bounds and the prefix the count changes nothing."""
        return max(self.min_items, self.max_items or 0, len(self.prefix))


@dataclass
class Node:
    object: ObjectSpec | None = None
    array: ArraySpec | None = None
    string: bool = False
    text: Pattern | None = None  # what a string's characters must match (None: any)
    number: str | None = None  # "number" or "integer"
    bounds: Range | None = None  # of a number
    literals: tuple[bytes, ...] = ()
    # while compiling only: a union's branches (merged once every reference is compiled)
    branches: tuple[int, ...] = ()
    exclusive: bool = False  # oneOf: no value may match two branches
    loose: bool = False  # from a non-strict tool's schema: held strings and numbers give way in a union

    def kinds(self) -> set[str]:
        """The kinds of JSON values it takes whole ("integer" for integral numbers)."""
        kinds = {k for k, spec in (("object", self.object), ("array", self.array)) if spec is not None}
        kinds |= {"string"} if self.string else set()
        return kinds | ({"integer", "number"} if self.number == "number" else {"integer"} if self.number else set())


@dataclass
class Grammar:
    nodes: list[Node] = field(default_factory=list)
    root: int = 0
    # per node, the fewest frames of the JSON machine (engine/structured/json_machine.py) a value of
    # it needs to be completed, its own frame included (NO_END: it cannot be), as an object, as an
    # array, and as whichever kind is cheapest: a value, or a key's value, is begun only where it
    # can also be completed within the machine's depth
    object_height: list[int] = field(default_factory=list)
    array_height: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    raw: bool = False  # the root is a string node whose pattern holds the whole answer (engine/structured/whole_text.py)


NO_END = 1 << 30  # no finite document completes it


def _heights(nodes: list[Node]) -> tuple[list[int], list[int], list[int]]:
    """Grammar.object_height, .array_height and .height, as a fixpoint: the cheapest completion of
    each node (a scalar: its one frame; an object: its key, and each required property's cheapest
    value one frame down; an array: nothing with no minItems, else its first minItems items one frame
    down). A
    tagged union's object counts its costliest variant: the tag, read after the object is begun,
    may pick any of them."""
    height = [NO_END] * len(nodes)
    objects, arrays = [NO_END] * len(nodes), [NO_END] * len(nodes)

    def object_height(spec: ObjectSpec) -> int:
        if spec.variants:  # variant nodes are plain objects (no variants of their own)
            return max(object_height(nodes[v].object) for v in spec.variants)
        required = [height[p.node] for p in spec.properties if p.required]
        return max(2, 1 + max(required)) if required else 1

    changed = True
    while changed:
        changed = False
        for n, node in enumerate(nodes):
            if node.object is not None:
                objects[n] = min(NO_END, object_height(node.object))
            if node.array is not None:
                spec = node.array
                needed = {spec.item(i) for i in range(min(spec.min_items, len(spec.prefix) + 1))}
                arrays[n] = min(NO_END, 1 + max(height[i] for i in needed)) if needed else 1
            best = min(objects[n], arrays[n], 1 if node.string or node.number or node.literals else NO_END)
            if best < height[n]:
                height[n], changed = best, True
    return objects, arrays, height


class SchemaError(ValueError):
    """What a schema asks that the grammar cannot or will not hold."""


def compile_schema(schema, param: str = PARAM) -> Grammar:
    """Raises InvalidParamError naming `param` (the request field the schema came from) for what it
    cannot or will not compile."""
    try:
        return _Compiler(schema).grammar
    except SchemaError as exc:
        raise InvalidParamError(f"{param}: {exc}", param) from None
    except RecursionError:
        raise InvalidParamError(f"{param}: the schema is nested too deeply", param) from None
    except UnicodeEncodeError:
        raise InvalidParamError(f"{param}: the schema's strings must be text (a lone surrogate is not)",
                                param) from None


def _hashable(value, what: str):
    """A keyword's value that must be a string (a `$ref`, a `type`), checked before it is looked up."""
    if not isinstance(value, str):
        _fail(f"{what} must be a string, got {json.dumps(value)[:80]}")
    return value


def _fail(message: str):
    raise SchemaError(message)


def _literal(value) -> bytes:
    if isinstance(value, (dict, list)) or isinstance(value, float) and not math.isfinite(value):
        _fail("enum and const values must be strings, finite numbers, booleans or null")
    return json.dumps(value, ensure_ascii=False).encode()  # a lone surrogate: compile_schema's 400


def _kind(literal: bytes) -> str:
    if literal[:1] == b'"':
        return "string"
    if literal in (b"true", b"false"):
        return "boolean"
    if literal == b"null":
        return "null"
    return "integer" if literal.lstrip(b"-").isdigit() else "number"


def _value(literal: bytes):
    """A literal as the JSON value it stands for: numbers by value (1 and 1.0 are one number)."""
    return Decimal(literal.decode()).normalize() if _kind(literal) in ("integer", "number") else literal


def _plain_number(literal: bytes) -> bytes:
    """A number literal's text without an exponent (1e+20 as 100000000000000000000)."""
    return format(Decimal(literal.decode()), "f").encode()


def _of_types(literal: bytes, types: list[str]) -> bool:
    """Whether a literal is of one of `types`: an integer is a number, and a number with no fraction
    (2.0, 1e2) an integer, as JSON Schema reads them."""
    kind = _kind(literal)
    if kind == "number" and "integer" in types and _value(literal) == _value(literal).to_integral_value():
        return True
    return kind in types or kind == "integer" and "number" in types


class _Compiler:
    def __init__(self, schema, patterns: dict | None = None, work: Work | None = None):
        """`patterns`, `work`: compiled patterns and the budget to build them to share (a loose
        schema's keywords are tried apart first)."""
        self.root_schema = schema
        self.resources = 0  # subschemas with their own $id that the compile is inside
        self.grammar = Grammar()
        self.refs: dict[str, int] = {}
        self.any: int | None = None
        self.literal_count = 0
        self.branch_count = 0
        self.merged: dict[int, tuple[Node, Node]] = {}  # id(union node) -> (it, merged): a $ref's copy is the same
        self.merging: set[int] = set()
        # by (source, minLength, maxLength): equal ones are one
        self.patterns: dict[tuple, Pattern] = {} if patterns is None else patterns
        self.work = Work() if work is None else work  # one budget for all of the schema's patterns
        self.grammar.root = self.compile(schema)
        self.merge_unions()
        self.grammar.object_height, self.grammar.array_height, self.grammar.height = _heights(self.grammar.nodes)
        root = self.grammar.nodes[self.grammar.root]
        scalar = root.string or root.number or root.literals
        height = min(self.grammar.object_height[self.grammar.root], self.grammar.array_height[self.grammar.root])
        if not scalar and height >= NO_END:
            _fail("no finite JSON document satisfies the schema (a required property or item leads back to "
                  "itself without end)")
        from engine.structured.json_machine import MAX_DEPTH  # (it imports this module)

        if not scalar and height > MAX_DEPTH:  # the machine opens no value it cannot close within MAX_DEPTH
            _fail(f"the schema's smallest document nests objects and arrays deeper than answers may (at most "
                  f"{MAX_DEPTH - 1} levels)")

    def new(self, node: Node | None = None) -> int:
        if len(self.grammar.nodes) >= MAX_NODES:
            _fail(f"the schema is too large (more than {MAX_NODES} nodes)")
        self.grammar.nodes.append(node)
        return len(self.grammar.nodes) - 1

    def any_value(self) -> int:
        """Any JSON value (objects with any keys, arrays of anything)."""
        if self.any is None:
            self.any = self.new()
            self.grammar.nodes[self.any] = Node(object=ObjectSpec(additional=self.any), array=ArraySpec(self.any),
                                                string=True, number="number",
                                                literals=(b"true", b"false", b"null"))
        return self.any

    def compile(self, schema) -> int:
        inner = isinstance(schema, dict) and "$id" in schema and schema is not self.root_schema
        self.resources += inner  # a subschema with its own $id: references inside it resolve against it
        try:
            return self._compile(schema)
        finally:
            self.resources -= inner

    def _compile(self, schema) -> int:
        if schema is True or schema == {}:
            return self.any_value()
        if not isinstance(schema, dict):
            _fail(f"a schema must be an object or true, got {json.dumps(schema)[:80]}")
        unknown = sorted(set(schema) - KEYWORDS)
        if unknown:
            _fail(f"schema keywords {', '.join(unknown)} are not supported")
        if schema.get(LOOSE) is LOOSE_MARK:
            schema = self.held_or_dropped(schema)
        if "$ref" in schema:
            return self.ref(schema)
        if "allOf" in schema:
            return self.all_of(schema)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.union(schema, key)
        return self.new(self.node(schema))

    def constraints(self, schema: dict) -> set:
        """Its keywords that constrain (a known format does)."""
        return set(schema) - ANNOTATIONS | ({"format"} if schema.get("format") in PATTERNS else set())

    def ref(self, schema: dict) -> int:
        if self.constraints(schema) != {"$ref"}:
            _fail("$ref beside other constraints is not supported")
        if self.resources:
            _fail("a $ref inside a subschema with its own $id (a bundled resource, which its references "
                  "resolve against) is not supported")
        ref = _hashable(schema["$ref"], "$ref")
        if ref not in self.refs:
            target = self.resolve(ref)
            self.refs[ref] = node = self.new()  # before compiling: a recursive schema finds it
            self.grammar.nodes[node] = self.node_of(self.compile(target))
        return self.refs[ref]

    def resolve(self, ref) -> dict:
        if not isinstance(ref, str) or not ref.startswith("#"):
            _fail(f"only local references (#/...) are supported, got {ref!r}")
        target = self.root_schema
        for part in [p for p in ref[1:].split("/") if p]:  # a URI fragment: percent-escapes, then JSON Pointer's
            part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target) and part == str(int(part)):
                target = target[int(part)]  # (an array's item: #/prefixItems/0)
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                _fail(f"the reference {ref} points to nothing")
        return target

    def all_of(self, schema: dict) -> int:
        branches = schema["allOf"]
        if self.constraints(schema) != {"allOf"} or not isinstance(branches, list) or len(branches) != 1:
            _fail("allOf is supported with one schema only")
        return self.compile(branches[0])

    def union(self, schema: dict, key: str) -> int:
        branches = schema[key]
        if self.constraints(schema) != {key} or not isinstance(branches, list) or not branches:
            _fail(f"{key} must be a non-empty list, beside no other constraints")
        self.branch_count += len(branches)
        if self.branch_count > MAX_BRANCHES:
            _fail(f"the schema is too large (more than {MAX_BRANCHES} union branches)")
        # merged at the end: a branch may refer to a schema still being compiled (a tree's Optional[Node])
        return self.new(Node(branches=tuple(self.compile(b) for b in branches), exclusive=key == "oneOf"))

    def node_of(self, index: int) -> Node:
        node = self.grammar.nodes[index]
        if node is None:
            _fail("a reference may not lead only to itself")
        return node

    def merge_unions(self) -> None:
        for i in range(len(self.grammar.nodes)):  # merging may add nodes (a tagged union's variants)
            self.grammar.nodes[i] = self.resolved(i)

    def resolved(self, index: int) -> Node:
        """The node at `index`, a union's branches merged."""
        node = self.node_of(index)
        if not node.branches:
            return node
        key = id(node)
        if key not in self.merged:
            if key in self.merging:
                _fail("a union may not contain itself")
            self.merging.add(key)
            parts = [self.resolved(b) for b in node.branches]
            if node.exclusive:
                _exclusive(parts)
            self.merged[key] = (node, self.merge(parts))
            self.merging.discard(key)
        return self.merged[key][1]

    def node(self, schema: dict) -> Node:
        if "const" in schema or "enum" in schema:
            return self.literals(schema)
        types = schema.get("type")
        if types is None:  # no type: what the keywords imply, else any value
            types = ["object"] if "properties" in schema or "additionalProperties" in schema else \
                ["array"] if "items" in schema or "prefixItems" in schema else list(TYPES)
        types = list(dict.fromkeys(_hashable(t, "type") for t in types)) if isinstance(types, list) else \
            [_hashable(types, "type")]
        if not types or any(t not in TYPES for t in types):
            _fail(f"type must be one or more of {', '.join(TYPES)}")
        parts = []
        for t in types:
            if t == "object":
                parts.append(Node(object=self.object(schema)))
            elif t == "array":
                parts.append(Node(array=self.array(schema)))
            elif t == "string":
                parts.append(Node(string=True, text=self.text(schema)))
            elif t in ("number", "integer"):
                parts.append(Node(number=t, bounds=self.bounds(schema, t)))
            elif t == "boolean":
                parts.append(Node(literals=(b"true", b"false")))
            else:
                parts.append(Node(literals=(b"null",)))
        merged = self.merge(parts)
        merged.loose = schema.get(LOOSE) is LOOSE_MARK
        return merged

    def literals(self, schema: dict) -> Node:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            _fail("enum must be a non-empty list")
        self.literal_count += len(values)
        if self.literal_count > MAX_LITERALS:
            _fail(f"at most {MAX_LITERALS} enum and const values in a schema")
        literals = list(dict.fromkeys(_literal(v) for v in values))
        if "const" in schema and "enum" in schema:  # both hold: the const, where the enum has it
            if not isinstance(schema["enum"], list) or literals[0] not in {_literal(v) for v in schema["enum"]}:
                _fail("const is not one of the enum's values: no value satisfies both")
        if "type" in schema:  # only the values of the given types
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            types = [_hashable(t, "type") for t in types]
            literals = [lit for lit in literals if _of_types(lit, types)]
            if not literals:
                _fail("no enum or const value is of the schema's type")
        text, bounds = self.text(schema), self.bounds(schema, "number")
        if text is not None or bounds is not None:  # only the values the string or number keywords take
            literals = [lit for lit in literals if _kind(lit) not in ("string", "integer", "number") or
                        (text is None or _kind(lit) != "string" or text.matches(json.loads(lit))) and
                        (bounds is None or _kind(lit) == "string" or bounds.holds(_plain_number(lit)))]
            if not literals:
                _fail("no enum or const value satisfies the schema's string or number keywords")
        return self.merge([Node(literals=(lit,)) for lit in literals])

    def text(self, schema: dict) -> Pattern | None:
        """What `pattern`, a known `format`, `minLength` and `maxLength` hold a string to (None: nothing)."""
        pattern, form = schema.get("pattern"), schema.get("format")
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if type(low) is not int or low < 0 or (high is not None and (type(high) is not int or high < low)):
            _fail("minLength and maxLength must be integers with 0 <= minLength <= maxLength")
        if pattern is not None and not isinstance(pattern, str):
            _fail("pattern must be a string")
        if form is not None and not isinstance(form, str):
            _fail("format must be a string")
        if pattern is not None and form in PATTERNS:
            _fail(f"pattern beside format {form!r} is not supported")
        source = pattern if pattern is not None else PATTERNS.get(form, "")
        if not source and low == 0 and high is None:
            return None
        what = f"pattern {source[:80]!r}" if pattern is not None else f"format {form!r}" if source else "the string"
        return self.pattern(source, low, high, what)

    def pattern(self, source: str, low: int = 0, high: int | None = None, what: str = "") -> Pattern:
        key = (source, low, high)
        if key not in self.patterns:
            try:
                self.patterns[key] = Pattern(source, low, high, work=self.work)
            except PatternError as exc:
                _fail(f"{what or 'pattern ' + repr(source[:80])}: {exc}")
        return self.patterns[key]

    def bounds(self, schema: dict, kind: str) -> Range | None:
        """What `minimum`, `maximum`, the exclusive ones and `multipleOf` hold a number to (None: nothing)."""
        try:
            bounds = Range.from_schema(schema)
        except (ValueError, OverflowError) as exc:
            _fail(str(exc) if isinstance(exc, ValueError) else "minimum and maximum must be finite numbers")
        if bounds is not None:  # integers too: JavaScript clients read them as doubles
            bounds = _as_read(bounds)
        if bounds is not None and bounds.empty(kind == "integer", NUMBER_BYTES):
            _fail(f"no {kind} of at most {NUMBER_BYTES} characters lies within the schema's minimum and maximum"
                  + (" and is a multiple of its multipleOf" if bounds.step is not None else ""))
        return bounds

    def object(self, schema: dict) -> ObjectSpec:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list) or \
                not all(isinstance(r, str) for r in required):
            _fail("properties must be an object and required a list of names")
        missing = [r for r in required if r not in properties]
        if missing:
            _fail(f"required names properties the schema does not define: {', '.join(map(str, missing))}")
        banned = [r for r in required if properties[r] is False]
        if banned:
            _fail(f"required properties whose schema is false (no value is valid): {', '.join(banned)}")
        if properties or ("properties" in schema and "additionalProperties" not in schema):
            # an object with `properties` (even none) gets no other keys: `{}` for `properties: {}`; a
            # property whose schema is false (a key the schema forbids) is never written
            return ObjectSpec(tuple(Property(json.dumps(name, ensure_ascii=False).encode(), self.compile(sub),
                                             name in required) for name, sub in properties.items() if sub is not False))
        additional = schema.get("additionalProperties", True)
        return ObjectSpec(additional=None if additional is False else self.compile(additional))

    def array(self, schema: dict) -> ArraySpec:
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if type(low) is not int or low < 0 or (high is not None and (type(high) is not int or high < low)):
            _fail("minItems and maxItems must be integers with 0 <= minItems <= maxItems")
        prefix = schema.get("prefixItems", [])
        if not isinstance(prefix, list):
            _fail("prefixItems must be a list of schemas")
        if len(prefix) > MAX_PREFIX_ITEMS:
            _fail(f"prefixItems may hold at most {MAX_PREFIX_ITEMS} schemas")
        nodes = tuple(self.compile(sub) for sub in prefix)
        items = schema.get("items", True)
        if items is False:  # nothing after the prefix
            high = len(nodes) if high is None else min(high, len(nodes))
            if low > high:
                _fail(f"minItems {low} asks more items than the {len(nodes)} that prefixItems allows (items is false)")
        return ArraySpec(None if items is False else self.compile(items), low, high, nodes)

    def merge(self, parts: list[Node]) -> Node:
        """One node for a union: each JSON kind from at most one branch, so that a value's first
        byte picks its branch."""
        out = Node()
        literals: dict[bytes, None] = {}
        objects = list(dict.fromkeys(part.object for part in parts if part.object is not None))
        out.object = objects[0] if len(objects) == 1 else self.tagged(objects) if objects else None
        for part in parts:
            if part.array is not None:
                if out.array is not None and out.array != part.array:
                    _fail("a union of two different array schemas is not supported")
                out.array = part.array
            literals.update(dict.fromkeys(part.literals))
        loose = out.loose = any(part.loose for part in parts)
        strings = [part for part in parts if part.string]
        if strings:  # a string that any characters make takes every other branch's strings
            texts = list(dict.fromkeys(part.text for part in strings))
            out.string = True
            out.text = None if None in texts else texts[0] if len(texts) == 1 else self.either(texts, loose)
            out.text = self.with_constants(out.text, [lit for lit in literals if _kind(lit) == "string"], loose)
        numbers = [part for part in parts if part.number is not None]
        if numbers:
            out.number = "number" if any(part.number == "number" for part in numbers) else "integer"
            bounds = {part.bounds for part in numbers}
            if len(bounds) == 1:
                out.bounds = bounds.pop()
            elif any(part.bounds is None and part.number == out.number for part in numbers) or loose:
                out.bounds = None  # an unbounded branch takes every other one's numbers
            else:
                _fail("a union of two different bounded number schemas is not supported")
            if out.bounds is not None and any(_kind(lit) in ("integer", "number") and
                                              not out.bounds.holds(_plain_number(lit)) for lit in literals):
                if not loose:
                    _fail("a union of a bounded number and a number constant outside its bounds is not supported")
                out.bounds = None
        covered = out.kinds()  # literals another branch already allows go; the rest must not clash with one
        if any(_kind(lit) == "number" and out.number == "integer" for lit in literals):
            _fail("an enum number that is not an integer beside an integer type is not supported")
        out.literals = tuple(lit for lit in literals if _kind(lit) not in covered)
        return out

    def either(self, texts: list[Pattern], loose: bool) -> Pattern | None:
        """A union of held strings: their patterns' alternatives (anchors hold per alternative), where
        none has a length (pydantic's `Union[datetime, date]`)."""
        if any(t.min_length or t.max_length is not None for t in texts):
            if loose:
                return None
            _fail("a union of two different constrained string schemas with lengths is not supported")
        return self.given_way(loose, "|".join(t.source for t in texts))

    def with_constants(self, text: Pattern | None, constants: list[bytes], loose: bool) -> Pattern | None:
        """A union's held string that also takes the string constants of its other branches."""
        missing = [c for c in map(json.loads, constants) if text is not None and not text.matches(c)]
        if not missing:
            return text
        if text.min_length or text.max_length is not None or not all(map(_writable, missing)):
            if loose:
                return None
            _fail("a union of a held string (with a length, or beside a constant with a control character) "
                  "and string constants it does not take is not supported")
        alternatives = "|".join(f"^{literal_pattern(c)}$" for c in missing)
        return self.given_way(loose, f"{text.source}|{alternatives}")

    def given_way(self, loose: bool, source: str) -> Pattern | None:
        """A union's pattern; where it does not compile, a loose union takes any string instead."""
        try:
            return self.pattern(source)
        except SchemaError:
            if loose:
                return None
            raise

    def held_or_dropped(self, schema: dict) -> dict:
        """A loose schema's string and number keywords (and format) where they compile beside its
        type, enum and const, and with no `$ref` or union beside them; else the schema without
        them. Tried in a compiler of their own that shares this one's patterns (compiled once)."""
        values = set(schema) & (VALUE_KEYWORDS | {"format"})
        if not values:
            return schema
        if not {"$ref", "anyOf", "oneOf", "allOf"} & set(schema):
            try:
                _Compiler({k: v for k, v in schema.items() if k in values | {"type", "enum", "const"}}, self.patterns, self.work)
                return schema
            except (SchemaError, RecursionError, ValueError):
                pass
        return {k: v for k, v in schema.items() if k not in values}

    def tagged(self, objects: list[ObjectSpec]) -> ObjectSpec:
        """A union of object schemas told apart by a tag: the same required key in each, whose values
        are constants no two of them share (what pydantic writes for a union of models with a Literal
        tag, wherever the models declare it). The tag is written first, and the document's tag picks
        the branch the rest follows."""
        key = self.tag_key(objects)
        objects = [_tag_first(o, key) for o in objects]
        first = [o.properties[0] if o.properties else None for o in objects]
        if any(p is None or not p.required or p.key != first[0].key for p in first):
            _fail("a union of object schemas needs the same required property in each, with a constant "
                  "value (a tag) that tells them apart")
        tags: dict[bytes, int] = {}
        values: set = set()
        for spec, prop in zip(objects, first):
            literals = self.resolved(prop.node)
            if not literals.literals or literals.kinds():
                _fail(f"the tag {prop.key.decode()} of a union of object schemas must be a constant or enum")
            # a branch that is itself a tagged union brings its own branches, each with its tags
            variants = spec.variants or (self.new(Node(object=spec)),) * len(literals.literals)
            for literal, variant in zip(literals.literals, variants):
                if _value(literal) in values:
                    _fail(f"two object schemas of a union share the tag {prop.key.decode()}: {literal.decode()}")
                values.add(_value(literal))
                tags[literal] = variant
        tag = self.new(Node(literals=tuple(tags)))
        return ObjectSpec((Property(first[0].key, tag, True),), variants=tuple(tags.values()))

    def tag_key(self, objects: list[ObjectSpec]) -> bytes | None:
        """The key that tells a union's objects apart: the first (in the first object's order) that
        each requires with constant values, no value in two of them; else the first object's first."""
        def constants(spec: ObjectSpec, key: bytes) -> set | None:
            prop = next((p for p in spec.properties if p.key == key and p.required), None)
            if prop is None:
                return None
            literals = self.resolved(prop.node)
            return None if not literals.literals or literals.kinds() else {_value(v) for v in literals.literals}

        for prop in objects[0].properties if objects[0].properties else ():
            values = [constants(o, prop.key) for o in objects]
            if all(v is not None for v in values) and sum(map(len, values)) == len(set().union(*values)):
                return prop.key
        return objects[0].properties[0].key if objects[0].properties else None


def _tag_first(spec: ObjectSpec, key: bytes | None) -> ObjectSpec:
    """The object with its property `key` moved first (keys are written in the schema's order; a
    client reads them in any)."""
    at = next((i for i, p in enumerate(spec.properties) if p.key == key), 0)
    if not at:
        return spec
    props = spec.properties
    return ObjectSpec((props[at],) + props[:at] + props[at + 1:], spec.additional, spec.variants)


def _writable(text: str) -> bool:
    """A held string can write it (control characters only with a short escape)."""
    return all(ord(c) >= 0x20 or c in "\b\t\n\f\r" for c in text)


def literal_pattern(text: str) -> str:
    """`text` as a pattern that matches it literally."""
    return "".join(c if c.isalnum() and c.isascii() else f"\\u{ord(c):04x}" if ord(c) < 0x20 else
                   "\\" + c if c.isascii() else c for c in text)


def _as_read(bounds: Range) -> Range:
    """A number's exclusive bounds as clients check them: they parse numbers as doubles, and
    0.99999999999999999999 (below 1) reads as 1.0, which `< 1` refuses. An exclusive bound becomes
    an inclusive one at the next double inward (rounding is monotonic: what is at or inside it reads
    inside the bound)."""
    low, high = bounds.low, bounds.high
    if bounds.low_open and low is not None and abs(low) < Decimal("1e300"):
        low = Decimal(repr(math.nextafter(float(low), math.inf)))
    if bounds.high_open and high is not None and abs(high) < Decimal("1e300"):
        high = Decimal(repr(math.nextafter(float(high), -math.inf)))
    return Range(low, bounds.low_open and low == bounds.low, high, bounds.high_open and high == bounds.high,
                 bounds.step)


def _exclusive(branches: list[Node]) -> None:
    """oneOf: refused where one value could match two branches (it would then match none)."""
    seen: set[str] = set()
    values: set = set()  # earlier branches' own literals, by value
    literal_kinds: set[str] = set()  # and their kinds
    objects = [b.object for b in branches if b.object is not None]
    if len(set(objects)) < len(objects):
        _fail("oneOf branches that one value could match both are not supported (anyOf takes them)")
    for branch in branches:
        kinds = branch.kinds() - {"object"}  # object branches are one, or told apart by their tags
        own = {lit for lit in branch.literals if _kind(lit) not in kinds}
        own_values = {_value(lit) for lit in own}
        if kinds & seen or own_values & values or any(_kind(lit) in seen for lit in own) or \
                kinds & literal_kinds:
            _fail("oneOf branches that one value could match both are not supported (anyOf takes them)")
        seen |= kinds
        values |= own_values
        literal_kinds |= {_kind(lit) for lit in own}
