// Native helpers of the knowledge data pipeline (built by setup.py with pybind11 alone).
//
//   Automaton            Aho-Corasick entity linker over the code points of a str or UTF-8 bytes:
//                        leftmost-longest, non-overlapping matches, character (code point) spans,
//                        GIL released while scanning, multi-threaded batches, serialised to a
//                        flat, bounds-checked byte format (never pickle).
//   build_sample_index   Megatron-style sample index: pack consecutive sentences of a document
//                        into samples of at most max_tokens tokens, repeat for the epochs,
//                        shuffle each epoch by a seeded hash sort (reproducible in NumPy).
//
// This file knows nothing of knowledge graphs, tokenizers or files; the Python side
// (rapidnlp/data/knowledge/) validates user input and gives the errors their wording.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int32_t kMaxCodePoint = 0x10FFFF;
constexpr int32_t kBlocks = (kMaxCodePoint >> 8) + 1;  // 0x1100 blocks of 256 code points
constexpr int kMaxAliasChars = 255;                     // depth is stored in one byte

// Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF). Returns -1 on invalid input.
inline int32_t decode_utf8(const uint8_t*& p, const uint8_t* end) {
    uint8_t b0 = *p;
    if (b0 < 0x80) {
        ++p;
        return b0;
    }
    int n;
    int32_t cp, min;
    if ((b0 & 0xE0) == 0xC0) { n = 1; cp = b0 & 0x1F; min = 0x80; }
    else if ((b0 & 0xF0) == 0xE0) { n = 2; cp = b0 & 0x0F; min = 0x800; }
    else if ((b0 & 0xF8) == 0xF0) { n = 3; cp = b0 & 0x07; min = 0x10000; }
    else return -1;
    if (end - p < n + 1) return -1;
    for (int k = 1; k <= n; ++k) {
        uint8_t b = p[k];
        if ((b & 0xC0) != 0x80) return -1;
        cp = (cp << 6) | (b & 0x3F);
    }
    if (cp < min || cp > kMaxCodePoint || (cp >= 0xD800 && cp <= 0xDFFF)) return -1;
    p += n + 1;
    return cp;
}

// ---- serialisation helpers -------------------------------------------------------------

const char kMagic[8] = {'R', 'N', 'L', 'P', 'A', 'C', '0', '1'};

template <typename T>
void put_vec(std::string& out, const std::vector<T>& v) {
    uint64_t n = v.size();
    out.append(reinterpret_cast<const char*>(&n), sizeof n);
    if (n) out.append(reinterpret_cast<const char*>(v.data()), n * sizeof(T));
}

struct Reader {
    const char* p;
    const char* end;
    template <typename T>
    std::vector<T> vec(const char* what) {
        uint64_t n;
        if (size_t(end - p) < sizeof n) throw std::invalid_argument(std::string("truncated before ") + what);
        std::memcpy(&n, p, sizeof n);
        p += sizeof n;
        if (n > uint64_t(end - p) / sizeof(T)) throw std::invalid_argument(std::string("truncated in ") + what);
        std::vector<T> v(n);
        if (n) std::memcpy(v.data(), p, n * sizeof(T));
        p += n * sizeof(T);
        return v;
    }
};

// ---- the automaton ---------------------------------------------------------------------

struct Match {
    int64_t start, end, alias;
};

class Automaton {
public:
    // Character map: code point -> dense char id (0: the code point occurs in no alias).
    std::vector<int32_t> cm_top;     // kBlocks entries: block number or -1
    std::vector<int32_t> cm_blocks;  // 256 char ids per block
    int32_t num_chars = 0;
    int64_t num_duplicates = 0;  // (alias, entity) pairs given more than once; build-time only
    // Trie + failure function, nodes in creation order, node 0 the root.
    std::vector<int32_t> edge_begin;  // N + 1 (CSR over edges, each node's edges sorted by char)
    std::vector<int32_t> edge_char;   // E
    std::vector<int32_t> edge_next;   // E
    std::vector<int32_t> root_next;   // num_chars + 1: the root's transitions, dense
    std::vector<int32_t> fail;        // N
    std::vector<int32_t> dict;        // N: nearest terminal node on the failure chain, or -1
    std::vector<int32_t> term;        // N: alias id ending at this node, or -1
    std::vector<uint8_t> depth;       // N: characters from the root
    // Aliases (unique, in sorted char-id order) and their entities.
    std::vector<int64_t> alias_ent_ptr;  // A + 1
    std::vector<int64_t> alias_ents;
    std::vector<int64_t> alias_text_ptr;  // A + 1 into alias_text
    std::vector<char> alias_text;         // UTF-8

    int64_t num_nodes() const { return int64_t(fail.size()); }
    int64_t num_aliases() const { return int64_t(alias_ent_ptr.size()) - 1; }

    inline int32_t char_id(int32_t cp) const {
        int32_t b = cm_top[cp >> 8];
        return b < 0 ? 0 : cm_blocks[size_t(b) * 256 + (cp & 255)];
    }

    inline int32_t child(int32_t s, int32_t c) const {
        int32_t lo = edge_begin[s], hi = edge_begin[s + 1];
        if (hi - lo <= 8) {
            for (int32_t e = lo; e < hi; ++e)
                if (edge_char[e] == c) return edge_next[e];
            return -1;
        }
        const int32_t* first = edge_char.data() + lo;
        const int32_t* last = edge_char.data() + hi;
        const int32_t* it = std::lower_bound(first, last, c);
        return (it != last && *it == c) ? edge_next[lo + (it - first)] : -1;
    }

    // aliases: UTF-8 strings (non-empty, <= kMaxAliasChars code points, validated by the caller
    // but checked again here); entities: one id per alias. Duplicated alias strings merge into
    // one alias with several entities, in input order.
    void build(const std::vector<std::pair<const char*, size_t>>& aliases, const int64_t* entities) {
        const size_t n = aliases.size();
        cm_top.assign(kBlocks, -1);
        cm_blocks.clear();
        num_chars = 0;
        num_duplicates = 0;
        std::vector<int64_t> seq_ptr(n + 1, 0);
        std::vector<int32_t> seq;
        seq.reserve(n * 4);
        for (size_t i = 0; i < n; ++i) {
            const uint8_t* p = reinterpret_cast<const uint8_t*>(aliases[i].first);
            const uint8_t* end = p + aliases[i].second;
            int64_t len = 0;
            while (p < end) {
                int32_t cp = decode_utf8(p, end);
                if (cp < 0) throw std::invalid_argument("alias " + std::to_string(i) + " is not valid UTF-8");
                int32_t& blk = cm_top[cp >> 8];
                if (blk < 0) {
                    blk = int32_t(cm_blocks.size() / 256);
                    cm_blocks.resize(cm_blocks.size() + 256, 0);
                }
                int32_t& id = cm_blocks[size_t(blk) * 256 + (cp & 255)];
                if (id == 0) id = ++num_chars;
                seq.push_back(id);
                ++len;
            }
            if (len == 0 || len > kMaxAliasChars)
                throw std::invalid_argument("alias " + std::to_string(i) + " has " + std::to_string(len) +
                                            " characters; 1 to " + std::to_string(kMaxAliasChars) + " allowed");
            seq_ptr[i + 1] = int64_t(seq.size());
        }

        auto equal = [&](int64_t a, int64_t b) {
            int64_t la = seq_ptr[a + 1] - seq_ptr[a], lb = seq_ptr[b + 1] - seq_ptr[b];
            return la == lb && std::equal(seq.begin() + seq_ptr[a], seq.begin() + seq_ptr[a + 1],
                                          seq.begin() + seq_ptr[b]);
        };
        // Sort by char sequence, ties by input index (so duplicated strings keep their entities in
        // input order). The first three char ids packed into one key settle most comparisons
        // without touching the sequences (ids < 2^21: every code point fits).
        struct Key {
            uint64_t prefix;
            int64_t index;
        };
        std::vector<Key> keys(n);
        for (size_t i = 0; i < n; ++i) {
            uint64_t k = 0;
            int64_t len = seq_ptr[i + 1] - seq_ptr[i];
            for (int64_t d = 0; d < 3; ++d) k = (k << 21) | uint64_t(d < len ? seq[seq_ptr[i] + d] : 0);
            keys[i] = {k, int64_t(i)};
        }
        std::sort(keys.begin(), keys.end(), [&](const Key& x, const Key& y) {
            if (x.prefix != y.prefix) return x.prefix < y.prefix;
            int64_t a = x.index, b = y.index;
            int64_t la = seq_ptr[a + 1] - seq_ptr[a], lb = seq_ptr[b + 1] - seq_ptr[b];
            if (la > 3 || lb > 3) {
                auto pa = seq.begin() + seq_ptr[a] + 3, pb = seq.begin() + seq_ptr[b] + 3;
                auto ea = seq.begin() + seq_ptr[a + 1], eb = seq.begin() + seq_ptr[b + 1];
                for (; pa < ea && pb < eb; ++pa, ++pb)
                    if (*pa != *pb) return *pa < *pb;
                if ((ea - pa) != (eb - pb)) return (ea - pa) < (eb - pb);
            } else if (la != lb) {
                return la < lb;
            }
            return a < b;
        });
        std::vector<int64_t> order(n);
        for (size_t i = 0; i < n; ++i) order[i] = keys[i].index;
        std::vector<Key>().swap(keys);

        // Trie from sorted strings: a path stack, new nodes only past the common prefix. Children
        // of a node are created in increasing char order, so the CSR edges come out sorted.
        std::vector<int32_t> parent{-1}, pchar{0}, terms{-1};
        std::vector<uint8_t> depths{0};
        std::vector<int32_t> path{0};
        alias_ent_ptr.assign(1, 0);
        alias_ents.clear();
        alias_text_ptr.assign(1, 0);
        alias_text.clear();
        int64_t prev = -1;
        for (size_t k = 0; k < n; ++k) {
            int64_t a = order[k];
            if (prev >= 0 && equal(prev, a)) {  // the same string again: one more entity for it
                auto first = alias_ents.begin() + alias_ent_ptr[alias_ent_ptr.size() - 2];
                if (std::find(first, alias_ents.end(), entities[a]) != alias_ents.end()) {
                    ++num_duplicates;  // the same (alias, entity) pair again
                } else {
                    alias_ents.push_back(entities[a]);
                    alias_ent_ptr.back() = int64_t(alias_ents.size());
                }
                continue;
            }
            int64_t len = seq_ptr[a + 1] - seq_ptr[a];
            int64_t common = 0;
            if (prev >= 0) {
                int64_t lp = seq_ptr[prev + 1] - seq_ptr[prev];
                while (common < std::min(len, lp) && seq[seq_ptr[a] + common] == seq[seq_ptr[prev] + common]) ++common;
            }
            path.resize(size_t(common) + 1);
            for (int64_t d = common; d < len; ++d) {
                int32_t node = int32_t(parent.size());
                parent.push_back(path.back());
                pchar.push_back(seq[seq_ptr[a] + d]);
                terms.push_back(-1);
                depths.push_back(uint8_t(d + 1));
                path.push_back(node);
            }
            terms[path.back()] = int32_t(alias_ent_ptr.size() - 1);
            alias_ents.push_back(entities[a]);
            alias_ent_ptr.push_back(int64_t(alias_ents.size()));
            alias_text.insert(alias_text.end(), aliases[a].first, aliases[a].first + aliases[a].second);
            alias_text_ptr.push_back(int64_t(alias_text.size()));
            prev = a;
        }
        if (parent.size() > size_t(INT32_MAX)) throw std::invalid_argument("alias table too large");
        const int32_t N = int32_t(parent.size());
        term = std::move(terms);
        depth = std::move(depths);

        edge_begin.assign(size_t(N) + 1, 0);
        for (int32_t v = 1; v < N; ++v) ++edge_begin[parent[v] + 1];
        for (int32_t v = 0; v < N; ++v) edge_begin[v + 1] += edge_begin[v];
        edge_char.assign(size_t(N > 0 ? N - 1 : 0), 0);
        edge_next.assign(edge_char.size(), 0);
        {
            std::vector<int32_t> fill(edge_begin.begin(), edge_begin.end() - 1);
            for (int32_t v = 1; v < N; ++v) {  // creation order == increasing char per parent
                int32_t e = fill[parent[v]]++;
                edge_char[e] = pchar[v];
                edge_next[e] = v;
            }
        }
        root_next.assign(size_t(num_chars) + 1, -1);
        for (int32_t e = edge_begin[0]; e < edge_begin[1]; ++e) root_next[edge_char[e]] = edge_next[e];

        // Failure and dictionary links in breadth-first order.
        fail.assign(N, 0);
        dict.assign(N, -1);
        std::vector<int32_t> queue;
        queue.reserve(N);
        for (int32_t e = edge_begin[0]; e < edge_begin[1]; ++e) queue.push_back(edge_next[e]);
        for (size_t qi = 0; qi < queue.size(); ++qi) {
            int32_t u = queue[qi];
            for (int32_t e = edge_begin[u]; e < edge_begin[u + 1]; ++e) {
                int32_t v = edge_next[e], c = edge_char[e];
                int32_t f = fail[u];
                int32_t t;
                while (true) {
                    t = f == 0 ? root_next[c] : child(f, c);
                    if (t >= 0 || f == 0) break;
                    f = fail[f];
                }
                fail[v] = t >= 0 ? t : 0;
                int32_t fv = fail[v];
                dict[v] = term[fv] >= 0 ? fv : dict[fv];
                queue.push_back(v);
            }
        }
    }

    // Leftmost-longest, non-overlapping matches of one text, appended to out as character spans.
    // Src yields code points (-1: invalid input). best is scratch space, one slot per character
    // (max_chars bounds them). Returns false on invalid input, with *bad_offset from src.
    template <typename Src>
    bool scan(Src src, size_t max_chars, std::vector<int32_t>& best, std::vector<Match>& out,
              size_t* bad_offset) const {
        if (best.size() < max_chars + 1) best.resize(max_chars + 1);
        int64_t pos = 0;  // characters consumed
        int32_t s = 0;
        const int32_t* fl = fail.data();
        const int32_t* dc = dict.data();
        const int32_t* tm = term.data();
        const uint8_t* dp = depth.data();
        const int32_t* rn = root_next.data();
        while (src.more()) {
            int32_t cp = src.next();
            if (cp < 0) {
                *bad_offset = src.offset();
                return false;
            }
            best[pos] = -1;
            ++pos;
            // Lone surrogates in a str are code points no alias holds: they simply never match.
            int32_t c = cp <= kMaxCodePoint ? char_id(cp) : 0;
            if (c == 0) {
                s = 0;
                continue;
            }
            while (true) {
                if (s == 0) {
                    s = rn[c];
                    if (s < 0) s = 0;
                    break;
                }
                int32_t t = child(s, c);
                if (t >= 0) {
                    s = t;
                    break;
                }
                s = fl[s];
            }
            for (int32_t o = tm[s] >= 0 ? s : dc[s]; o >= 0; o = dc[o]) {
                int64_t start = pos - dp[o];
                int32_t b = best[start];
                if (b < 0 || dp[b] < dp[o]) best[start] = o;
            }
        }
        for (int64_t i = 0; i < pos;) {
            int32_t b = best[i];
            if (b >= 0) {
                out.push_back(Match{i, i + dp[b], tm[b]});
                i += dp[b];
            } else {
                ++i;
            }
        }
        return true;
    }

    std::string serialise() const {
        std::string out(kMagic, sizeof kMagic);
        std::vector<int32_t> header{num_chars};
        put_vec(out, header);
        // Only the occupied blocks of the character map: (block number, 256 ids) each.
        std::vector<int32_t> used;
        for (int32_t b = 0; b < kBlocks; ++b)
            if (cm_top[b] >= 0) used.push_back(b);
        std::vector<int32_t> blocks;
        for (int32_t b : used) {
            blocks.push_back(b);
            blocks.insert(blocks.end(), cm_blocks.begin() + size_t(cm_top[b]) * 256,
                          cm_blocks.begin() + size_t(cm_top[b]) * 256 + 256);
        }
        put_vec(out, blocks);
        put_vec(out, edge_begin);
        put_vec(out, edge_char);
        put_vec(out, edge_next);
        put_vec(out, fail);
        put_vec(out, dict);
        put_vec(out, term);
        put_vec(out, depth);
        put_vec(out, alias_ent_ptr);
        put_vec(out, alias_ents);
        put_vec(out, alias_text_ptr);
        put_vec(out, alias_text);
        return out;
    }

    // Every index is checked: a corrupt or hostile file raises, it never crashes the process.
    static Automaton deserialise(const std::string& data) {
        if (data.size() < sizeof kMagic || std::memcmp(data.data(), kMagic, sizeof kMagic) != 0)
            throw std::invalid_argument("not a RapidNLP linker (bad magic)");
        Reader r{data.data() + sizeof kMagic, data.data() + data.size()};
        Automaton a;
        auto header = r.vec<int32_t>("header");
        if (header.size() != 1 || header[0] < 0 || header[0] > kMaxCodePoint + 1)
            throw std::invalid_argument("bad header");
        a.num_chars = header[0];
        auto blocks = r.vec<int32_t>("character map");
        if (blocks.size() % 257) throw std::invalid_argument("bad character map");
        a.cm_top.assign(kBlocks, -1);
        std::vector<uint8_t> seen(size_t(a.num_chars) + 1, 0);
        for (size_t k = 0; k < blocks.size(); k += 257) {
            int32_t b = blocks[k];
            if (b < 0 || b >= kBlocks || a.cm_top[b] >= 0) throw std::invalid_argument("bad character map block");
            a.cm_top[b] = int32_t(a.cm_blocks.size() / 256);
            for (int j = 1; j <= 256; ++j) {
                int32_t id = blocks[k + j];
                if (id < 0 || id > a.num_chars || (id && seen[id]++)) throw std::invalid_argument("bad character id");
                a.cm_blocks.push_back(id);
            }
        }
        a.edge_begin = r.vec<int32_t>("edges");
        a.edge_char = r.vec<int32_t>("edge chars");
        a.edge_next = r.vec<int32_t>("edge targets");
        a.fail = r.vec<int32_t>("failure links");
        a.dict = r.vec<int32_t>("dictionary links");
        a.term = r.vec<int32_t>("terminals");
        a.depth = r.vec<uint8_t>("depths");
        a.alias_ent_ptr = r.vec<int64_t>("alias entities");
        a.alias_ents = r.vec<int64_t>("entities");
        a.alias_text_ptr = r.vec<int64_t>("alias offsets");
        a.alias_text = r.vec<char>("alias text");
        if (r.p != r.end) throw std::invalid_argument("trailing bytes");

        const int64_t N = int64_t(a.fail.size());
        const int64_t E = int64_t(a.edge_char.size());
        const int64_t A = int64_t(a.alias_ent_ptr.size()) - 1;
        auto bad = [](const char* what) { throw std::invalid_argument(std::string("inconsistent ") + what); };
        if (N < 1 || N > INT32_MAX || int64_t(a.edge_begin.size()) != N + 1 || int64_t(a.edge_next.size()) != E ||
            int64_t(a.dict.size()) != N || int64_t(a.term.size()) != N || int64_t(a.depth.size()) != N || A < 0 ||
            int64_t(a.alias_text_ptr.size()) != A + 1)
            bad("array sizes");
        if (a.edge_begin[0] != 0 || a.edge_begin[N] != E) bad("edge offsets");
        for (int64_t v = 0; v < N; ++v) {
            if (a.edge_begin[v + 1] < a.edge_begin[v]) bad("edge offsets");
            for (int32_t e = a.edge_begin[v]; e < a.edge_begin[v + 1]; ++e) {
                if (a.edge_char[e] < 1 || a.edge_char[e] > a.num_chars) bad("edge chars");
                if (e > a.edge_begin[v] && a.edge_char[e] <= a.edge_char[e - 1]) bad("edge order");
                int32_t t = a.edge_next[e];
                if (t < 1 || t >= N || a.depth[t] != a.depth[v] + 1) bad("edge targets");
            }
            // Failure links point strictly up (shallower), so following them always ends at the root.
            if (a.fail[v] < 0 || a.fail[v] >= N || (v > 0 && a.depth[a.fail[v]] >= a.depth[v]) || (v == 0 && a.fail[0] != 0))
                bad("failure links");
            int32_t d = a.dict[v];
            if (d < -1 || d >= N || (d >= 0 && (a.depth[d] >= a.depth[v] || a.term[d] < 0))) bad("dictionary links");
            if (a.term[v] < -1 || a.term[v] >= A || (a.term[v] >= 0 && v == 0)) bad("terminals");
        }
        if (a.depth[0] != 0) bad("depths");
        if (a.alias_ent_ptr[0] != 0 || a.alias_ent_ptr[A] != int64_t(a.alias_ents.size())) bad("alias entities");
        if (a.alias_text_ptr[0] != 0 || a.alias_text_ptr[A] != int64_t(a.alias_text.size())) bad("alias offsets");
        for (int64_t i = 0; i < A; ++i) {
            if (a.alias_ent_ptr[i + 1] <= a.alias_ent_ptr[i]) bad("alias entities");
            if (a.alias_text_ptr[i + 1] < a.alias_text_ptr[i]) bad("alias offsets");
        }
        a.root_next.assign(size_t(a.num_chars) + 1, -1);
        for (int32_t e = a.edge_begin[0]; e < a.edge_begin[1]; ++e) a.root_next[a.edge_char[e]] = a.edge_next[e];
        return a;
    }
};

// Code points of UTF-8 bytes (strictly validated) ...
struct Utf8Source {
    const uint8_t* begin;
    const uint8_t* p;
    const uint8_t* end;
    bool more() const { return p < end; }
    int32_t next() { return decode_utf8(p, end); }
    size_t offset() const { return size_t(p - begin); }
};

// ... and of a str's own storage (1, 2 or 4 bytes per code point): no encoding, no copy.
template <typename T>
struct UcsSource {
    const T* p;
    const T* end;
    bool more() const { return p < end; }
    int32_t next() { return int32_t(*p++); }
    size_t offset() const { return 0; }
};

// A Python text without copying: a str (its code points) or bytes (UTF-8). The list or object
// that holds it keeps it alive while the GIL is released; both types are immutable.
struct TextView {
    const void* data;
    size_t size;  // bytes for UTF-8, code points for a str
    int kind;     // 0: UTF-8 bytes; 1, 2, 4: PyUnicode storage width
};

TextView text_view(const py::handle& obj, size_t index) {
    PyObject* o = obj.ptr();
    if (PyUnicode_Check(o)) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(o) != 0) throw py::error_already_set();  // a legacy (wstr) string
#endif
        return {PyUnicode_DATA(o), size_t(PyUnicode_GET_LENGTH(o)), int(PyUnicode_KIND(o))};
    }
    if (PyBytes_Check(o)) return {PyBytes_AS_STRING(o), size_t(PyBytes_GET_SIZE(o)), 0};
    throw py::type_error("text " + std::to_string(index) + " is " + std::string(Py_TYPE(o)->tp_name) +
                         ", expected str or bytes");
}

bool scan_text(const Automaton& a, const TextView& t, std::vector<int32_t>& best, std::vector<Match>& out,
               size_t* bad) {
    switch (t.kind) {
        case 1: {
            auto p = static_cast<const uint8_t*>(t.data);
            return a.scan(UcsSource<uint8_t>{p, p + t.size}, t.size, best, out, bad);
        }
        case 2: {
            auto p = static_cast<const uint16_t*>(t.data);
            return a.scan(UcsSource<uint16_t>{p, p + t.size}, t.size, best, out, bad);
        }
        case 4: {
            auto p = static_cast<const uint32_t*>(t.data);
            return a.scan(UcsSource<uint32_t>{p, p + t.size}, t.size, best, out, bad);
        }
        default: {
            auto p = static_cast<const uint8_t*>(t.data);
            return a.scan(Utf8Source{p, p, p + t.size}, t.size, best, out, bad);
        }
    }
}

// Aliases are compiled from UTF-8 (a str's cached UTF-8, or bytes).
std::pair<const char*, size_t> utf8_of(const py::handle& obj, size_t index) {
    PyObject* o = obj.ptr();
    if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        const char* s = PyUnicode_AsUTF8AndSize(o, &n);
        if (!s) {
            PyErr_Clear();
            throw py::value_error("alias " + std::to_string(index) +
                                  " cannot be encoded as UTF-8 (it holds a lone surrogate)");
        }
        return {s, size_t(n)};
    }
    if (PyBytes_Check(o)) return {PyBytes_AS_STRING(o), size_t(PyBytes_GET_SIZE(o))};
    throw py::type_error("alias " + std::to_string(index) + " is " + std::string(Py_TYPE(o)->tp_name) +
                         ", expected str or bytes");
}

py::array_t<int64_t> matches_array(const std::vector<Match>& m, const Automaton& a) {
    py::array_t<int64_t> out({py::ssize_t(m.size()), py::ssize_t(4)});
    auto w = out.mutable_unchecked<2>();
    for (size_t i = 0; i < m.size(); ++i) {
        w(i, 0) = m[i].start;
        w(i, 1) = m[i].end;
        w(i, 2) = m[i].alias;
        w(i, 3) = a.alias_ents[a.alias_ent_ptr[m[i].alias]];
    }
    return out;
}

std::string utf8_error(size_t text, size_t offset) {
    return "text " + std::to_string(text) + " is not valid UTF-8 at byte " + std::to_string(offset);
}

// ---- sample index ----------------------------------------------------------------------

inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

// The permutation of [0, n) that sorts the keys splitmix64(epoch_key ^ i), ties by i.
void hash_sort_permutation(uint64_t epoch_key, int64_t n, int64_t* out) {
    std::vector<std::pair<uint64_t, int64_t>> keys(n), tmp(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = {splitmix64(epoch_key ^ uint64_t(i)), i};
    // Keys are uniform: bucket by the top bits, then sort the small buckets.
    int bits = 0;
    while (bits < 24 && (int64_t(1) << bits) * 16 < n) ++bits;
    const int64_t nb = int64_t(1) << bits;
    std::vector<int64_t> start(nb + 1, 0);
    auto bucket = [&](uint64_t k) { return bits ? int64_t(k >> (64 - bits)) : 0; };
    for (auto& kv : keys) ++start[bucket(kv.first) + 1];
    for (int64_t b = 0; b < nb; ++b) start[b + 1] += start[b];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (auto& kv : keys) tmp[fill[bucket(kv.first)]++] = kv;
    for (int64_t b = 0; b < nb; ++b) std::sort(tmp.begin() + start[b], tmp.begin() + start[b + 1]);
    for (int64_t i = 0; i < n; ++i) out[i] = tmp[i].second;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native helpers of rapidnlp.data.knowledge: Aho-Corasick linker, sample index.";
    m.attr("MAX_ALIAS_CHARS") = kMaxAliasChars;

    py::class_<Automaton>(m, "Automaton")
        .def_static(
            "build",
            [](const py::list& aliases, py::array_t<int64_t, py::array::c_style | py::array::forcecast> entities) {
                if (entities.ndim() != 1 || size_t(entities.shape(0)) != aliases.size())
                    throw py::value_error("entities must be one id per alias");
                std::vector<std::pair<const char*, size_t>> views(aliases.size());
                std::vector<py::object> keep(aliases.size());  // alive while the GIL is released
                for (size_t i = 0; i < aliases.size(); ++i) {
                    keep[i] = aliases[i];
                    views[i] = utf8_of(keep[i], i);
                }
                Automaton a;
                const int64_t* ents = entities.data();
                {
                    py::gil_scoped_release nogil;
                    a.build(views, ents);
                }
                return a;
            },
            py::arg("aliases"), py::arg("entities"))
        .def(
            "link",
            [](const Automaton& a, const py::object& text) {
                TextView t = text_view(text, 0);
                std::vector<Match> out;
                bool ok;
                size_t bad = 0;
                {
                    py::gil_scoped_release nogil;
                    std::vector<int32_t> best;
                    ok = scan_text(a, t, best, out, &bad);
                }
                if (!ok) throw py::value_error(utf8_error(0, bad));
                return matches_array(out, a);
            },
            py::arg("text"))
        .def(
            "link_batch",
            [](const Automaton& a, const py::sequence& texts, int num_threads) {
                const size_t n = texts.size();
                std::vector<TextView> views(n);
                // Own a reference to every text: another Python thread may empty the list while
                // the GIL is released, and the views must outlive that.
                std::vector<py::object> keep(n);
                for (size_t i = 0; i < n; ++i) {
                    keep[i] = texts[i];
                    views[i] = text_view(keep[i], i);
                }
                if (num_threads <= 0) num_threads = int(std::max(1u, std::thread::hardware_concurrency()));
                num_threads = int(std::min<size_t>(size_t(num_threads), std::max<size_t>(n, 1)));
                // Texts are handed out in chunks from a shared counter: long and short texts balance.
                const size_t chunk = std::max<size_t>(1, std::min<size_t>(256, n / (size_t(num_threads) * 8) + 1));
                std::vector<std::vector<Match>> per_text(n);
                std::atomic<size_t> next{0};
                std::vector<size_t> bad_text(num_threads, SIZE_MAX), bad_off(num_threads, 0);
                {
                    py::gil_scoped_release nogil;
                    auto work = [&](int w) {
                        std::vector<int32_t> best;
                        for (size_t lo; (lo = next.fetch_add(chunk)) < n;) {
                            for (size_t i = lo; i < std::min(n, lo + chunk); ++i) {
                                size_t off;
                                if (!scan_text(a, views[i], best, per_text[i], &off) &&
                                    i < bad_text[w]) {
                                    bad_text[w] = i;
                                    bad_off[w] = off;
                                }
                            }
                        }
                    };
                    std::vector<std::thread> pool;
                    for (int w = 1; w < num_threads; ++w) pool.emplace_back(work, w);
                    work(0);
                    for (auto& t : pool) t.join();
                }
                size_t first_bad = SIZE_MAX, off = 0;
                for (int w = 0; w < num_threads; ++w)
                    if (bad_text[w] < first_bad) first_bad = bad_text[w], off = bad_off[w];
                if (first_bad != SIZE_MAX) throw py::value_error(utf8_error(first_bad, off));
                py::array_t<int64_t> offsets(py::ssize_t(n + 1));
                auto o = offsets.mutable_unchecked<1>();
                o(0) = 0;
                for (size_t i = 0; i < n; ++i) o(i + 1) = o(i) + int64_t(per_text[i].size());
                py::array_t<int64_t> spans({py::ssize_t(o(n)), py::ssize_t(4)});
                auto w = spans.mutable_unchecked<2>();
                size_t k = 0;
                for (size_t i = 0; i < n; ++i)
                    for (const Match& mt : per_text[i]) {
                        w(k, 0) = mt.start;
                        w(k, 1) = mt.end;
                        w(k, 2) = mt.alias;
                        w(k, 3) = a.alias_ents[a.alias_ent_ptr[mt.alias]];
                        ++k;
                    }
                return py::make_tuple(offsets, spans);
            },
            py::arg("texts"), py::arg("num_threads") = 1)
        .def_property_readonly("num_aliases", &Automaton::num_aliases)
        .def_property_readonly("num_nodes", &Automaton::num_nodes)
        .def_property_readonly("num_duplicates", [](const Automaton& a) { return a.num_duplicates; })
        .def_property_readonly("num_chars", [](const Automaton& a) { return a.num_chars; })
        .def("alias", [](const Automaton& a, int64_t i) {
            if (i < 0 || i >= a.num_aliases()) throw py::index_error("alias id out of range");
            return py::str(a.alias_text.data() + a.alias_text_ptr[i], size_t(a.alias_text_ptr[i + 1] - a.alias_text_ptr[i]));
        })
        .def("entities", [](const Automaton& a, int64_t i) {
            if (i < 0 || i >= a.num_aliases()) throw py::index_error("alias id out of range");
            return py::array_t<int64_t>(a.alias_ent_ptr[i + 1] - a.alias_ent_ptr[i], a.alias_ents.data() + a.alias_ent_ptr[i]);
        })
        .def("to_bytes", [](const Automaton& a) { return py::bytes(a.serialise()); })
        .def_static("from_bytes", [](const py::bytes& b) { return Automaton::deserialise(std::string(b)); })
        // Pickling (multiprocessing) goes through the same flat format, never pickled internals.
        .def(py::pickle([](const Automaton& a) { return py::bytes(a.serialise()); },
                        [](const py::bytes& b) { return Automaton::deserialise(std::string(b)); }));

    m.def(
        "build_sample_index",
        [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> sequence_lengths,
           py::array_t<int64_t, py::array::c_style | py::array::forcecast> document_indices, int64_t max_tokens,
           int64_t num_epochs, uint64_t seed, bool shuffle) {
            if (max_tokens < 1) throw py::value_error("max_tokens must be at least 1");
            if (num_epochs < 1) throw py::value_error("num_epochs must be at least 1");
            if (sequence_lengths.ndim() != 1 || document_indices.ndim() != 1 || document_indices.shape(0) < 1)
                throw py::value_error("sequence_lengths and document_indices must be 1-D, document_indices non-empty");
            const int32_t* len = sequence_lengths.data();
            const int64_t* di = document_indices.data();
            const int64_t S = sequence_lengths.shape(0), D = document_indices.shape(0) - 1;
            if (di[0] != 0 || di[D] != S) throw py::value_error("document_indices must run from 0 to the sequence count");
            for (int64_t d = 0; d < D; ++d)
                if (di[d + 1] < di[d]) throw py::value_error("document_indices must not decrease");
            std::vector<int64_t> ranges;
            std::vector<int64_t> out_data;
            {
                py::gil_scoped_release nogil;
                ranges.reserve(size_t(S) * 2);
                for (int64_t d = 0; d < D; ++d) {
                    int64_t first = di[d], tokens = 0;
                    for (int64_t s = di[d]; s < di[d + 1]; ++s) {
                        int64_t nt = len[s];
                        if (s > first && tokens + nt > max_tokens) {
                            ranges.push_back(first);
                            ranges.push_back(s);
                            first = s;
                            tokens = 0;
                        }
                        tokens += nt;
                    }
                    if (di[d + 1] > first && tokens > 0) {
                        ranges.push_back(first);
                        ranges.push_back(di[d + 1]);
                    }
                }
                const int64_t R = int64_t(ranges.size() / 2);
                out_data.resize(size_t(R * num_epochs * 2));
                std::vector<int64_t> perm(R);
                const uint64_t seed_key = splitmix64(seed);
                for (int64_t e = 0; e < num_epochs; ++e) {
                    if (shuffle) {
                        hash_sort_permutation(splitmix64(seed_key ^ uint64_t(e)), R, perm.data());
                    } else {
                        for (int64_t i = 0; i < R; ++i) perm[i] = i;
                    }
                    int64_t* o = out_data.data() + e * R * 2;
                    for (int64_t i = 0; i < R; ++i) {
                        o[2 * i] = ranges[2 * perm[i]];
                        o[2 * i + 1] = ranges[2 * perm[i] + 1];
                    }
                }
            }
            py::array_t<int64_t> out({py::ssize_t(out_data.size() / 2), py::ssize_t(2)});
            if (!out_data.empty()) std::memcpy(out.mutable_data(), out_data.data(), out_data.size() * sizeof(int64_t));
            return out;
        },
        py::arg("sequence_lengths"), py::arg("document_indices"), py::arg("max_tokens"), py::arg("num_epochs") = 1,
        py::arg("seed") = 0, py::arg("shuffle") = true,
        "Sample index [num_epochs * R, 2] of (first sequence, end sequence), each epoch a seeded "
        "permutation of the R packed samples.");
}
