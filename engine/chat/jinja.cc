#include "engine/chat/jinja.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <map>
#include <optional>
#include <regex>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine::jinja {
namespace {

using json = nlohmann::ordered_json;

// ------------------------------------------------------------------ values

struct Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // insertion order
struct Callable;

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kArray, kObject, kCallable };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<Array> array;
  std::shared_ptr<Object> object;  // also a namespace (shared, mutable through `set ns.x`)
  bool is_namespace = false;
  std::shared_ptr<const Callable> callable;

  static Value None() { return Value{.kind = Kind::kNone}; }
  static Value Bool(bool v) { return Value{.kind = Kind::kBool, .b = v}; }
  static Value Int(int64_t v) { return Value{.kind = Kind::kInt, .i = v}; }
  static Value Float(double v) { return Value{.kind = Kind::kFloat, .f = v}; }
  static Value Str(std::string v) { return Value{.kind = Kind::kString, .s = std::move(v)}; }
  static Value List(Array v) {
    return Value{.kind = Kind::kArray, .array = std::make_shared<Array>(std::move(v))};
  }
  static Value Dict(Object v) {
    return Value{.kind = Kind::kObject, .object = std::make_shared<Object>(std::move(v))};
  }
  bool undefined() const { return kind == Kind::kUndefined; }
  bool number() const { return kind == Kind::kInt || kind == Kind::kFloat; }
  double num() const { return kind == Kind::kInt ? static_cast<double>(i) : f; }
  const Value* Find(std::string_view key) const {
    if (kind != Kind::kObject) return nullptr;
    for (const auto& [k, v] : *object) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;

struct Callable {
  std::string name;
  std::function<absl::StatusOr<Value>(const Args&, const Kwargs&)> fn;
};

Value FromJson(const json& j) {
  switch (j.type()) {
    case json::value_t::null:
      return Value::None();
    case json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case json::value_t::number_integer:
      return Value::Int(j.get<int64_t>());
    case json::value_t::number_unsigned:
      return Value::Int(static_cast<int64_t>(j.get<uint64_t>()));
    case json::value_t::number_float:
      return Value::Float(j.get<double>());
    case json::value_t::string:
      return Value::Str(j.get<std::string>());
    case json::value_t::array: {
      Array a;
      for (const json& e : j) a.push_back(FromJson(e));
      return Value::List(std::move(a));
    }
    case json::value_t::object: {
      Object o;
      for (auto it = j.begin(); it != j.end(); ++it) o.push_back({it.key(), FromJson(it.value())});
      return Value::Dict(std::move(o));
    }
    default:
      return Value();
  }
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.b;
    case Value::Kind::kInt:
      return v.i != 0;
    case Value::Kind::kFloat:
      return v.f != 0;
    case Value::Kind::kString:
      return !v.s.empty();
    case Value::Kind::kArray:
      return !v.array->empty();
    case Value::Kind::kObject:
      return v.is_namespace || !v.object->empty();
    case Value::Kind::kCallable:
      return true;
  }
  return false;
}

const char* KindName(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "none";
    case Value::Kind::kBool:
      return "boolean";
    case Value::Kind::kInt:
      return "integer";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "string";
    case Value::Kind::kArray:
      return "list";
    case Value::Kind::kObject:
      return v.is_namespace ? "namespace" : "dict";
    case Value::Kind::kCallable:
      return "callable";
  }
  return "value";
}

std::string FloatText(double f) {
  if (f == 0 && std::signbit(f)) return "-0.0";
  if (std::floor(f) == f && std::fabs(f) < 1e16) return absl::StrCat(static_cast<int64_t>(f), ".0");
  return json(f).dump();
}

std::string ToJson(const Value& v, int indent, int depth);

// What {{ }} prints (as @huggingface/jinja: none and undefined print nothing).
std::string ToText(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return "";
    case Value::Kind::kBool:
      return v.b ? "true" : "false";
    case Value::Kind::kInt:
      return absl::StrCat(v.i);
    case Value::Kind::kFloat:
      return FloatText(v.f);
    case Value::Kind::kString:
      return v.s;
    case Value::Kind::kArray:
    case Value::Kind::kObject:
      return ToJson(v, 0, 0);
    case Value::Kind::kCallable:
      return v.callable->name;
  }
  return "";
}

// JSON as Python's json.dumps (", " and ": ", non-ASCII kept), indent > 0: pretty.
std::string ToJson(const Value& v, int indent, int depth) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return "null";
    case Value::Kind::kBool:
      return v.b ? "true" : "false";
    case Value::Kind::kInt:
      return absl::StrCat(v.i);
    case Value::Kind::kFloat:
      return json(v.f).dump();
    case Value::Kind::kString:
      return json(v.s).dump(-1, ' ', false, json::error_handler_t::replace);
    case Value::Kind::kCallable:
      return "null";
    case Value::Kind::kArray:
    case Value::Kind::kObject: {
      const std::string pad = indent > 0 ? "\n" + std::string(indent * depth, ' ') : "";
      const std::string child = indent > 0 ? pad + std::string(indent, ' ') : "";
      const std::string sep = indent > 0 ? "," : ", ";
      std::vector<std::string> parts;
      if (v.kind == Value::Kind::kArray) {
        for (const Value& e : *v.array) parts.push_back(child + ToJson(e, indent, depth + 1));
      } else {
        for (const auto& [k, e] : *v.object) {
          parts.push_back(child + json(k).dump(-1, ' ', false, json::error_handler_t::replace) +
                          ": " + ToJson(e, indent, depth + 1));
        }
      }
      const char open = v.kind == Value::Kind::kArray ? '[' : '{';
      const char close = v.kind == Value::Kind::kArray ? ']' : '}';
      if (parts.empty()) return std::string{open, close};
      return std::string(1, open) + absl::StrJoin(parts, sep) + (indent > 0 ? pad : "") + close;
    }
  }
  return "null";
}

bool Equal(const Value& a, const Value& b) {
  if (a.number() && b.number()) return a.num() == b.num();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kBool:
      return a.b == b.b;
    case Value::Kind::kString:
      return a.s == b.s;
    case Value::Kind::kArray:
      if (a.array->size() != b.array->size()) return false;
      for (size_t i = 0; i < a.array->size(); ++i) {
        if (!Equal((*a.array)[i], (*b.array)[i])) return false;
      }
      return true;
    case Value::Kind::kObject:
      if (a.object == b.object) return true;
      if (a.object->size() != b.object->size()) return false;
      for (const auto& [k, v] : *a.object) {
        const Value* o = b.Find(k);
        if (o == nullptr || !Equal(v, *o)) return false;
      }
      return true;
    default:
      return a.callable == b.callable;
  }
}

// ------------------------------------------------------------------ lexer

struct Token {
  enum class Kind { kName, kString, kInt, kFloat, kOp, kEnd };
  Kind kind;
  std::string text;
  int line = 1;
};

// One piece of the template: text, {{ expression }} or {% statement %}.
struct Piece {
  enum class Kind { kText, kExpr, kStmt };
  Kind kind;
  std::string text;           // kText
  std::vector<Token> tokens;  // kExpr, kStmt (ending in kEnd)
  int line = 1;
};

absl::Status SyntaxError(int line, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("chat template line ", line, ": ", std::string(what)));
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Tokens of a tag body from source[*pos], up to and past `close`.
absl::Status LexTag(std::string_view src, size_t* pos, std::string_view close, int* line,
                    std::vector<Token>* out, bool* strip_after) {
  size_t p = *pos;
  while (true) {
    while (p < src.size() && IsSpace(src[p])) {
      if (src[p] == '\n') ++*line;
      ++p;
    }
    if (p >= src.size())
      return SyntaxError(*line, absl::StrCat("missing '", std::string(close), "'"));
    if (src[p] == '-' && src.substr(p + 1, close.size()) == close) {
      *strip_after = true;
      *pos = p + 1 + close.size();
      out->push_back({Token::Kind::kEnd, "", *line});
      return absl::OkStatus();
    }
    if (src.substr(p, close.size()) == close) {
      *pos = p + close.size();
      out->push_back({Token::Kind::kEnd, "", *line});
      return absl::OkStatus();
    }
    const char c = src[p];
    if (c == '\'' || c == '"') {
      std::string s;
      ++p;
      while (p < src.size() && src[p] != c) {
        if (src[p] == '\\' && p + 1 < src.size()) {
          const char e = src[++p];
          switch (e) {
            case 'n':
              s += '\n';
              break;
            case 't':
              s += '\t';
              break;
            case 'r':
              s += '\r';
              break;
            case 'b':
              s += '\b';
              break;
            case 'f':
              s += '\f';
              break;
            case 'v':
              s += '\v';
              break;
            default:
              s += e;  // \' \" \\ and anything else: the character itself
          }
          ++p;
          continue;
        }
        if (src[p] == '\n') ++*line;
        s += src[p++];
      }
      if (p >= src.size()) return SyntaxError(*line, "unterminated string");
      ++p;
      out->push_back({Token::Kind::kString, std::move(s), *line});
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t q = p;
      bool is_float = false;
      while (q < src.size() && (std::isdigit(static_cast<unsigned char>(src[q])) || src[q] == '_'))
        ++q;
      if (q + 1 < src.size() && src[q] == '.' &&
          std::isdigit(static_cast<unsigned char>(src[q + 1]))) {
        is_float = true;
        ++q;
        while (q < src.size() && std::isdigit(static_cast<unsigned char>(src[q]))) ++q;
      }
      std::string digits(src.substr(p, q - p));
      std::erase(digits, '_');
      out->push_back({is_float ? Token::Kind::kFloat : Token::Kind::kInt, digits, *line});
      p = q;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t q = p;
      while (q < src.size() && (std::isalnum(static_cast<unsigned char>(src[q])) || src[q] == '_'))
        ++q;
      out->push_back({Token::Kind::kName, std::string(src.substr(p, q - p)), *line});
      p = q;
      continue;
    }
    static constexpr std::string_view kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
    bool two = false;
    for (std::string_view op : kTwo) {
      if (src.substr(p, 2) == op) {
        out->push_back({Token::Kind::kOp, std::string(op), *line});
        p += 2;
        two = true;
        break;
      }
    }
    if (two) continue;
    if (std::string_view("()[]{}.,:|=<>+-*/%~").find(c) == std::string_view::npos) {
      return SyntaxError(*line, absl::StrCat("unexpected character '", std::string(1, c), "'"));
    }
    out->push_back({Token::Kind::kOp, std::string(1, c), *line});
    ++p;
  }
}

// Hugging Face's preprocessing (trim_blocks, lstrip_blocks, no final newline), then pieces.
absl::StatusOr<std::vector<Piece>> Lex(std::string_view source) {
  std::string src(source);
  if (!src.empty() && src.back() == '\n') src.pop_back();
  src = std::regex_replace(src, std::regex(R"((^|\n)[ \t]*(\{[#%-]))"), "$1$2");
  src = std::regex_replace(src, std::regex(R"(([#%-]\})\n)"), "$1");
  std::vector<Piece> pieces;
  size_t p = 0;
  int line = 1;
  bool strip_next = false;
  while (p < src.size()) {
    size_t open = src.find('{', p);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#') {
      open = src.find('{', open + 1);
    }
    if (open + 1 >= src.size()) open = std::string::npos;
    std::string text = src.substr(p, open == std::string::npos ? std::string::npos : open - p);
    if (strip_next) {
      const size_t first = text.find_first_not_of(" \t\r\n");
      text = first == std::string::npos ? "" : text.substr(first);
    }
    strip_next = false;
    const bool strip_before =
        open != std::string::npos && open + 2 < src.size() && src[open + 2] == '-';
    if (strip_before) {
      const size_t last = text.find_last_not_of(" \t\r\n");
      text = last == std::string::npos ? "" : text.substr(0, last + 1);
    }
    if (!text.empty()) pieces.push_back({Piece::Kind::kText, text, {}, line});
    line += static_cast<int>(std::count(
        src.begin() + p, open == std::string::npos ? src.end() : src.begin() + open, '\n'));
    if (open == std::string::npos) break;
    const char kind = src[open + 1];
    size_t body = open + 2 + (strip_before ? 1 : 0);
    if (kind == '#') {
      const size_t end = src.find("#}", body);
      if (end == std::string::npos) return SyntaxError(line, "unterminated comment");
      line += static_cast<int>(std::count(src.begin() + open, src.begin() + end, '\n'));
      strip_next = end > body && src[end - 1] == '-';
      p = end + 2;
      continue;
    }
    Piece piece{kind == '{' ? Piece::Kind::kExpr : Piece::Kind::kStmt, "", {}, line};
    RETURN_IF_ERROR(
        LexTag(src, &body, kind == '{' ? "}}" : "%}", &line, &piece.tokens, &strip_next));
    pieces.push_back(std::move(piece));
    p = body;
  }
  return pieces;
}

// ------------------------------------------------------------------ syntax tree

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kUnary,
    kBinary,
    kCond,
    kList,
    kDict
  };
  Kind kind;
  int line = 1;
  Value literal;               // kLiteral
  std::string name;            // kName, kAttr, kFilter, kTest, operator
  ExprPtr a, b, c;             // operands (c: slice step, cond's else)
  std::vector<ExprPtr> items;  // kCall / kFilter / kTest args, kList, kDict (k, v, ...)
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negate = false;  // kTest: `is not`
};

}  // namespace

struct Node {
  enum class Kind { kBody, kText, kOutput, kIf, kFor, kSet, kMacro, kBreak, kContinue };
  Kind kind;
  int line = 1;
  std::string text;                               // kText
  ExprPtr expr;                                   // kOutput, kSet value, kFor iterable
  std::vector<std::shared_ptr<const Node>> body;  // kBody children, kFor body, kSet block, kMacro
  // kIf: conditions and their bodies (a null condition: else).
  std::vector<std::pair<ExprPtr, std::shared_ptr<const Node>>> branches;
  std::vector<std::string> targets;  // kFor loop variables, kSet name (and attribute), kMacro name
  ExprPtr filter;                    // kFor `if`
  std::shared_ptr<const Node> else_body;                // kFor
  std::vector<std::pair<std::string, ExprPtr>> params;  // kMacro (defaults may be null)
};
using NodePtr = std::shared_ptr<const Node>;

namespace {

// Nesting a template may use (parentheses, brackets, unary operators; blocks): deeper is refused
// at Parse rather than recursing without bound.
constexpr int kMaxNesting = 128;

class ExprParser {
 public:
  explicit ExprParser(const std::vector<Token>& tokens) : t_(tokens) {}

  const Token& Peek(size_t ahead = 0) const { return t_[std::min(i_ + ahead, t_.size() - 1)]; }
  bool AtEnd() const { return Peek().kind == Token::Kind::kEnd; }
  bool IsOp(std::string_view op, size_t ahead = 0) const {
    return Peek(ahead).kind == Token::Kind::kOp && Peek(ahead).text == op;
  }
  bool IsName(std::string_view n, size_t ahead = 0) const {
    return Peek(ahead).kind == Token::Kind::kName && Peek(ahead).text == n;
  }
  const Token& Next() { return t_[std::min(i_++, t_.size() - 1)]; }
  absl::Status Expect(std::string_view op) {
    if (!IsOp(op)) {
      return SyntaxError(
          Peek().line, absl::StrCat("expected '", std::string(op), "', found '", Peek().text, "'"));
    }
    ++i_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Name() {
    if (Peek().kind != Token::Kind::kName) {
      return SyntaxError(Peek().line, absl::StrCat("expected a name, found '", Peek().text, "'"));
    }
    return Next().text;
  }
  absl::Status ExpectEnd() {
    if (!AtEnd()) return SyntaxError(Peek().line, absl::StrCat("unexpected '", Peek().text, "'"));
    return absl::OkStatus();
  }

  // expr := or ['if' or ['else' expr]]
  absl::StatusOr<ExprPtr> Parse() {
    Nest nest(this);
    if (depth_ > kMaxNesting) return SyntaxError(Peek().line, "expression nested too deep");
    ASSIGN_OR_RETURN(ExprPtr value, Or());
    if (!IsName("if")) return value;
    const int line = Next().line;
    ASSIGN_OR_RETURN(ExprPtr cond, Or());
    ExprPtr otherwise;
    if (IsName("else")) {
      Next();
      ASSIGN_OR_RETURN(otherwise, Parse());
    }
    return Make({.kind = Expr::Kind::kCond, .line = line, .a = cond, .b = value, .c = otherwise});
  }
  // Without the conditional (a `for` iterable followed by `if`).
  absl::StatusOr<ExprPtr> ParseNoCond() { return Or(); }

 private:
  static ExprPtr Make(Expr e) { return std::make_shared<const Expr>(std::move(e)); }
  ExprPtr Binary(std::string op, ExprPtr a, ExprPtr b, int line) {
    return Make({.kind = Expr::Kind::kBinary, .line = line, .name = std::move(op), .a = a, .b = b});
  }

  absl::StatusOr<ExprPtr> Or() {
    ASSIGN_OR_RETURN(ExprPtr left, And());
    while (IsName("or")) {
      const int line = Next().line;
      ASSIGN_OR_RETURN(ExprPtr right, And());
      left = Binary("or", left, right, line);
    }
    return left;
  }
  absl::StatusOr<ExprPtr> And() {
    ASSIGN_OR_RETURN(ExprPtr left, Not());
    while (IsName("and")) {
      const int line = Next().line;
      ASSIGN_OR_RETURN(ExprPtr right, Not());
      left = Binary("and", left, right, line);
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Not() {
    Nest nest(this);
    if (depth_ > kMaxNesting) return SyntaxError(Peek().line, "expression nested too deep");
    if (IsName("not")) {
      const int line = Next().line;
      ASSIGN_OR_RETURN(ExprPtr operand, Not());
      return Make({.kind = Expr::Kind::kUnary, .line = line, .name = "not", .a = operand});
    }
    return Compare();
  }
  absl::StatusOr<ExprPtr> Compare() {
    ASSIGN_OR_RETURN(ExprPtr left, Concat());
    while (true) {
      const int line = Peek().line;
      std::string op;
      if (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") || IsOp(">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        Next();
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        Next();
        Next();
        op = "not in";
      } else if (IsName("is")) {
        Next();
        bool negate = false;
        if (IsName("not")) {
          Next();
          negate = true;
        }
        ASSIGN_OR_RETURN(std::string test, Name());
        Expr e{.kind = Expr::Kind::kTest, .line = line, .name = test, .a = left, .negate = negate};
        if (IsOp("(")) {
          RETURN_IF_ERROR(Arguments(&e));
        } else if (Peek().kind == Token::Kind::kString || Peek().kind == Token::Kind::kInt ||
                   Peek().kind == Token::Kind::kFloat ||
                   (Peek().kind == Token::Kind::kName && !IsName("and") && !IsName("or") &&
                    !IsName("else") && !IsName("if") && !IsName("is") && !IsName("in") &&
                    !IsName("not"))) {
          ASSIGN_OR_RETURN(ExprPtr arg, Primary());  // `is divisibleby 3`, `is sameas x`
          e.items.push_back(arg);
        }
        left = Make(std::move(e));
        continue;
      } else {
        return left;
      }
      ASSIGN_OR_RETURN(ExprPtr right, Concat());
      left = Binary(op, left, right, line);
    }
  }
  absl::StatusOr<ExprPtr> Concat() {
    ASSIGN_OR_RETURN(ExprPtr left, Additive());
    while (IsOp("~")) {
      const int line = Next().line;
      ASSIGN_OR_RETURN(ExprPtr right, Additive());
      left = Binary("~", left, right, line);
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Additive() {
    ASSIGN_OR_RETURN(ExprPtr left, Multiplicative());
    while (IsOp("+") || IsOp("-")) {
      const Token& op = Next();
      ASSIGN_OR_RETURN(ExprPtr right, Multiplicative());
      left = Binary(op.text, left, right, op.line);
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Multiplicative() {
    ASSIGN_OR_RETURN(ExprPtr left, Unary());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token& op = Next();
      ASSIGN_OR_RETURN(ExprPtr right, Unary());
      left = Binary(op.text, left, right, op.line);
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Unary() {
    Nest nest(this);
    if (depth_ > kMaxNesting) return SyntaxError(Peek().line, "expression nested too deep");
    if (IsOp("-") || IsOp("+")) {
      const Token& op = Next();
      ASSIGN_OR_RETURN(ExprPtr operand, Unary());
      return Make({.kind = Expr::Kind::kUnary, .line = op.line, .name = op.text, .a = operand});
    }
    ASSIGN_OR_RETURN(ExprPtr e, Postfix());
    while (IsOp("|")) {
      const int line = Next().line;
      ASSIGN_OR_RETURN(std::string filter, Name());
      Expr f{.kind = Expr::Kind::kFilter, .line = line, .name = filter, .a = e};
      if (IsOp("(")) RETURN_IF_ERROR(Arguments(&f));
      e = Make(std::move(f));
    }
    if (IsOp("**")) {  // binds tighter than unary minus on its left, right-associative
      const int line = Next().line;
      ASSIGN_OR_RETURN(ExprPtr exponent, Unary());
      e = Binary("**", e, exponent, line);
    }
    return e;
  }
  absl::Status Arguments(Expr* e) {
    RETURN_IF_ERROR(Expect("("));
    while (!IsOp(")")) {
      if (Peek().kind == Token::Kind::kName && IsOp("=", 1)) {
        std::string key = Next().text;
        Next();
        ASSIGN_OR_RETURN(ExprPtr value, Parse());
        e->kwargs.push_back({std::move(key), value});
      } else {
        ASSIGN_OR_RETURN(ExprPtr value, Parse());
        e->items.push_back(value);
      }
      if (!IsOp(")")) RETURN_IF_ERROR(Expect(","));
    }
    return Expect(")");
  }
  absl::StatusOr<ExprPtr> Postfix() {
    ASSIGN_OR_RETURN(ExprPtr e, Primary());
    while (true) {
      const int line = Peek().line;
      if (IsOp(".")) {
        Next();
        ASSIGN_OR_RETURN(std::string attr, Name());
        e = Make({.kind = Expr::Kind::kAttr, .line = line, .name = attr, .a = e});
      } else if (IsOp("[")) {
        Next();
        ExprPtr parts[3];
        int part = 0;
        bool slice = false;
        while (!IsOp("]")) {
          if (IsOp(":")) {
            Next();
            slice = true;
            if (++part > 2) return SyntaxError(line, "a slice has at most 3 parts");
            continue;
          }
          ASSIGN_OR_RETURN(parts[part], Parse());
          if (!IsOp("]") && !IsOp(":")) return SyntaxError(line, "expected ']'");
        }
        Next();
        if (slice) {
          Expr s{.kind = Expr::Kind::kSlice, .line = line, .a = e, .b = parts[0], .c = parts[1]};
          s.items.push_back(parts[2]);
          e = Make(std::move(s));
        } else {
          if (!parts[0]) return SyntaxError(line, "empty subscript");
          e = Make({.kind = Expr::Kind::kItem, .line = line, .a = e, .b = parts[0]});
        }
      } else if (IsOp("(")) {
        Expr call{.kind = Expr::Kind::kCall, .line = line, .a = e};
        RETURN_IF_ERROR(Arguments(&call));
        e = Make(std::move(call));
      } else {
        return e;
      }
    }
  }
  absl::StatusOr<ExprPtr> Primary() {
    const Token& t = Next();
    switch (t.kind) {
      case Token::Kind::kString: {
        std::string s = t.text;
        while (Peek().kind == Token::Kind::kString) s += Next().text;  // adjacent literals join
        return Make({.kind = Expr::Kind::kLiteral, .line = t.line, .literal = Value::Str(s)});
      }
      case Token::Kind::kInt: {
        int64_t value = 0;
        if (!absl::SimpleAtoi(t.text, &value)) {  // past int64: refused, never thrown
          return SyntaxError(t.line,
                             absl::StrCat("integer literal out of range: ", t.text.substr(0, 32)));
        }
        return Make({.kind = Expr::Kind::kLiteral, .line = t.line, .literal = Value::Int(value)});
      }
      case Token::Kind::kFloat:  // strtod: a literal past the range is +-inf, as in JavaScript
        return Make({.kind = Expr::Kind::kLiteral,
                     .line = t.line,
                     .literal = Value::Float(std::strtod(t.text.c_str(), nullptr))});
      case Token::Kind::kName: {
        if (t.text == "true" || t.text == "True") {
          return Make({.kind = Expr::Kind::kLiteral, .line = t.line, .literal = Value::Bool(true)});
        }
        if (t.text == "false" || t.text == "False") {
          return Make(
              {.kind = Expr::Kind::kLiteral, .line = t.line, .literal = Value::Bool(false)});
        }
        if (t.text == "none" || t.text == "None") {
          return Make({.kind = Expr::Kind::kLiteral, .line = t.line, .literal = Value::None()});
        }
        return Make({.kind = Expr::Kind::kName, .line = t.line, .name = t.text});
      }
      case Token::Kind::kOp:
        if (t.text == "(") {
          ASSIGN_OR_RETURN(ExprPtr first, Parse());
          if (IsOp(")")) {
            Next();
            return first;
          }
          Expr tuple{.kind = Expr::Kind::kList, .line = t.line};
          tuple.items.push_back(first);
          while (IsOp(",")) {
            Next();
            if (IsOp(")")) break;
            ASSIGN_OR_RETURN(ExprPtr item, Parse());
            tuple.items.push_back(item);
          }
          RETURN_IF_ERROR(Expect(")"));
          return Make(std::move(tuple));
        }
        if (t.text == "[") {
          Expr list{.kind = Expr::Kind::kList, .line = t.line};
          while (!IsOp("]")) {
            ASSIGN_OR_RETURN(ExprPtr item, Parse());
            list.items.push_back(item);
            if (!IsOp("]")) RETURN_IF_ERROR(Expect(","));
          }
          Next();
          return Make(std::move(list));
        }
        if (t.text == "{") {
          Expr dict{.kind = Expr::Kind::kDict, .line = t.line};
          while (!IsOp("}")) {
            ASSIGN_OR_RETURN(ExprPtr key, Parse());
            RETURN_IF_ERROR(Expect(":"));
            ASSIGN_OR_RETURN(ExprPtr value, Parse());
            dict.items.push_back(key);
            dict.items.push_back(value);
            if (!IsOp("}")) RETURN_IF_ERROR(Expect(","));
          }
          Next();
          return Make(std::move(dict));
        }
        [[fallthrough]];
      default:
        return SyntaxError(t.line, absl::StrCat("unexpected '", t.text, "' in an expression"));
    }
  }

  struct Nest {  // counts the recursion it is in
    explicit Nest(ExprParser* p) : p(p) { ++p->depth_; }
    ~Nest() { --p->depth_; }
    ExprParser* p;
  };

  const std::vector<Token>& t_;
  size_t i_ = 0;
  int depth_ = 0;
};

class Parser {
 public:
  explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  absl::StatusOr<NodePtr> Parse() {
    std::string stop;
    ASSIGN_OR_RETURN(NodePtr body, Body({}, &stop));
    if (!stop.empty()) return SyntaxError(line_, absl::StrCat("unexpected '", stop, "'"));
    return body;
  }

 private:
  // Nodes up to a statement whose keyword is in `stops` (left unconsumed in *stop, with its
  // piece current) or the end.
  absl::StatusOr<NodePtr> Body(const std::vector<std::string_view>& stops, std::string* stop) {
    if (++depth_ > kMaxNesting) return SyntaxError(line_, "blocks nested too deep");
    struct Leave {
      int* depth;
      ~Leave() { --*depth; }
    } leave{&depth_};
    auto node = std::make_shared<Node>(Node{.kind = Node::Kind::kBody});
    stop->clear();
    while (at_ < pieces_.size()) {
      const Piece& piece = pieces_[at_];
      line_ = piece.line;
      if (piece.kind == Piece::Kind::kText) {
        node->body.push_back(std::make_shared<Node>(
            Node{.kind = Node::Kind::kText, .line = line_, .text = piece.text}));
        ++at_;
        continue;
      }
      ExprParser p(piece.tokens);
      if (piece.kind == Piece::Kind::kExpr) {
        ASSIGN_OR_RETURN(ExprPtr e, p.Parse());
        RETURN_IF_ERROR(p.ExpectEnd());
        node->body.push_back(
            std::make_shared<Node>(Node{.kind = Node::Kind::kOutput, .line = line_, .expr = e}));
        ++at_;
        continue;
      }
      ASSIGN_OR_RETURN(std::string keyword, p.Name());
      if (std::find(stops.begin(), stops.end(), keyword) != stops.end()) {
        *stop = keyword;
        return node;
      }
      ++at_;
      ASSIGN_OR_RETURN(NodePtr stmt, Statement(keyword, p));
      if (stmt) node->body.push_back(stmt);
    }
    return node;
  }

  absl::StatusOr<NodePtr> Statement(const std::string& keyword, ExprParser& p) {
    const int line = line_;
    std::string stop;
    if (keyword == "if") {
      auto node = std::make_shared<Node>(Node{.kind = Node::Kind::kIf, .line = line});
      ASSIGN_OR_RETURN(ExprPtr cond, p.Parse());
      RETURN_IF_ERROR(p.ExpectEnd());
      while (true) {
        ASSIGN_OR_RETURN(NodePtr body, Body({"elif", "else", "endif"}, &stop));
        node->branches.push_back({cond, body});
        if (stop.empty()) return SyntaxError(line, "'if' without 'endif'");
        ExprParser q(pieces_[at_++].tokens);
        q.Next();
        if (stop == "endif") {
          RETURN_IF_ERROR(q.ExpectEnd());
          return node;
        }
        if (stop == "else") {
          RETURN_IF_ERROR(q.ExpectEnd());
          cond = nullptr;
          continue;
        }
        if (!cond) return SyntaxError(line_, "'elif' after 'else'");
        ASSIGN_OR_RETURN(cond, q.Parse());
        RETURN_IF_ERROR(q.ExpectEnd());
      }
    }
    if (keyword == "for") {
      auto node = std::make_shared<Node>(Node{.kind = Node::Kind::kFor, .line = line});
      do {
        ASSIGN_OR_RETURN(std::string target, p.Name());
        node->targets.push_back(target);
      } while (p.IsOp(",") && (p.Next(), true));
      if (!p.IsName("in")) return SyntaxError(line, "expected 'in' in 'for'");
      p.Next();
      ASSIGN_OR_RETURN(node->expr, p.ParseNoCond());
      if (p.IsName("if")) {
        p.Next();
        ASSIGN_OR_RETURN(node->filter, p.ParseNoCond());
      }
      if (p.IsName("recursive")) return SyntaxError(line, "unsupported: recursive loops");
      RETURN_IF_ERROR(p.ExpectEnd());
      ASSIGN_OR_RETURN(NodePtr body, Body({"else", "endfor"}, &stop));
      node->body.push_back(body);
      if (stop.empty()) return SyntaxError(line, "'for' without 'endfor'");
      ++at_;
      if (stop == "else") {
        ASSIGN_OR_RETURN(node->else_body, Body({"endfor"}, &stop));
        if (stop.empty()) return SyntaxError(line, "'for' without 'endfor'");
        ++at_;
      }
      return node;
    }
    if (keyword == "set") {
      auto node = std::make_shared<Node>(Node{.kind = Node::Kind::kSet, .line = line});
      ASSIGN_OR_RETURN(std::string target, p.Name());
      node->targets.push_back(target);
      if (p.IsOp(".")) {
        p.Next();
        ASSIGN_OR_RETURN(std::string attr, p.Name());
        node->targets.push_back(attr);
      } else {
        while (p.IsOp(",")) {  // `set a, b = ...`
          p.Next();
          ASSIGN_OR_RETURN(std::string more, p.Name());
          node->targets.push_back(more);
        }
        if (node->targets.size() > 1) node->targets.insert(node->targets.begin(), "");
      }
      if (p.AtEnd()) {  // block set
        ASSIGN_OR_RETURN(NodePtr body, Body({"endset"}, &stop));
        if (stop.empty()) return SyntaxError(line, "'set' without 'endset'");
        ++at_;
        node->body.push_back(body);
        return node;
      }
      RETURN_IF_ERROR(p.Expect("="));
      ASSIGN_OR_RETURN(ExprPtr value, p.Parse());
      if (p.IsOp(",")) {  // a tuple without parentheses
        Expr tuple{.kind = Expr::Kind::kList, .line = line};
        tuple.items.push_back(value);
        while (p.IsOp(",")) {
          p.Next();
          ASSIGN_OR_RETURN(ExprPtr item, p.Parse());
          tuple.items.push_back(item);
        }
        value = std::make_shared<const Expr>(std::move(tuple));
      }
      node->expr = value;
      RETURN_IF_ERROR(p.ExpectEnd());
      return node;
    }
    if (keyword == "macro") {
      auto node = std::make_shared<Node>(Node{.kind = Node::Kind::kMacro, .line = line});
      ASSIGN_OR_RETURN(std::string name, p.Name());
      node->targets.push_back(name);
      RETURN_IF_ERROR(p.Expect("("));
      while (!p.IsOp(")")) {
        ASSIGN_OR_RETURN(std::string param, p.Name());
        ExprPtr def;
        if (p.IsOp("=")) {
          p.Next();
          ASSIGN_OR_RETURN(def, p.Parse());
        }
        node->params.push_back({param, def});
        if (!p.IsOp(")")) RETURN_IF_ERROR(p.Expect(","));
      }
      RETURN_IF_ERROR(p.Expect(")"));
      RETURN_IF_ERROR(p.ExpectEnd());
      ASSIGN_OR_RETURN(NodePtr body, Body({"endmacro"}, &stop));
      if (stop.empty()) return SyntaxError(line, "'macro' without 'endmacro'");
      ++at_;
      node->body.push_back(body);
      return node;
    }
    if (keyword == "break" || keyword == "continue") {
      RETURN_IF_ERROR(p.ExpectEnd());
      return std::make_shared<Node>(Node{
          .kind = keyword == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, .line = line});
    }
    if (keyword == "generation" || keyword == "endgeneration") {
      RETURN_IF_ERROR(p.ExpectEnd());
      return NodePtr();  // transformers' assistant-mask markers: render nothing
    }
    return SyntaxError(line, absl::StrCat("unsupported statement '", keyword, "'"));
  }

  std::vector<Piece> pieces_;
  size_t at_ = 0;
  int line_ = 1;
  int depth_ = 0;
};

constexpr int kMaxDepth = 64;                    // nested macro calls and loops
constexpr int64_t kMaxIterations = 1000000;      // loop iterations of one render
constexpr size_t kMaxOutput = size_t{16} << 20;  // bytes of the output, and of any one string

absl::Status RenderError(int line, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("chat template line ", line, ": ", std::string(what)));
}

std::string StripChars(std::string s, std::string_view chars, bool left, bool right) {
  if (right) {
    const size_t last = s.find_last_not_of(chars);
    s = last == std::string::npos ? "" : s.substr(0, last + 1);
  }
  if (left) {
    const size_t first = s.find_first_not_of(chars);
    s = first == std::string::npos ? "" : s.substr(first);
  }
  return s;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string Upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
std::string Title(std::string s) {
  bool start = true;
  for (char& c : s) {
    const auto u = static_cast<unsigned char>(c);
    c = static_cast<char>(start ? std::toupper(u) : std::tolower(u));
    start = !std::isalnum(u);
  }
  return s;
}
std::string Capitalize(std::string s) {
  s = Lower(std::move(s));
  if (!s.empty()) s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
  return s;
}
std::string Replace(std::string s, const std::string& from, const std::string& to, int64_t count) {
  if (from.empty()) return s;
  std::string out;
  size_t at = 0;
  for (int64_t n = 0; count < 0 || n < count; ++n) {
    const size_t hit = s.find(from, at);
    if (hit == std::string::npos) break;
    out += s.substr(at, hit - at) + to;
    at = hit + from.size();
  }
  return out + s.substr(at);
}

// Elements a `for` or a filter iterates: list items, dict keys, string characters (bytes).
absl::StatusOr<Array> Iterate(const Value& v, int line) {
  switch (v.kind) {
    case Value::Kind::kArray:
      return *v.array;
    case Value::Kind::kObject: {
      Array keys;
      for (const auto& [k, e] : *v.object) keys.push_back(Value::Str(k));
      return keys;
    }
    case Value::Kind::kString: {
      Array chars;
      for (char c : v.s) chars.push_back(Value::Str(std::string(1, c)));
      return chars;
    }
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return Array();
    default:
      return RenderError(line, absl::StrCat("cannot iterate over a ", KindName(v)));
  }
}

int64_t Length(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kString: {
      int64_t n = 0;  // code points, as Python's len()
      for (unsigned char c : v.s) n += (c & 0xC0) != 0x80 ? 1 : 0;
      return n;
    }
    case Value::Kind::kArray:
      return static_cast<int64_t>(v.array->size());
    case Value::Kind::kObject:
      return static_cast<int64_t>(v.object->size());
    default:
      return 0;
  }
}

// Python's slice indices for a sequence of n elements.
std::vector<int64_t> SliceIndices(int64_t n, std::optional<int64_t> start,
                                  std::optional<int64_t> stop, int64_t step) {
  std::vector<int64_t> out;
  auto clamp = [&](int64_t i, int64_t lo, int64_t hi) {
    if (i < 0) i += n;
    return std::clamp(i, lo, hi);
  };
  if (step > 0) {
    const int64_t a = start ? clamp(*start, 0, n) : 0;
    const int64_t b = stop ? clamp(*stop, 0, n) : n;
    for (int64_t i = a; i < b; i += step) out.push_back(i);
  } else {
    const int64_t a = start ? clamp(*start, -1, n - 1) : n - 1;
    const int64_t b = stop ? clamp(*stop, -1, n - 1) : -1;
    for (int64_t i = a; i > b; i += step) out.push_back(i);
  }
  return out;
}

class Renderer {
 public:
  explicit Renderer(const json& context) {
    scopes_.emplace_back();
    if (context.is_object()) {
      for (auto it = context.begin(); it != context.end(); ++it) {
        scopes_.back()[it.key()] = FromJson(it.value());
      }
    }
  }

  absl::Status Run(const Node& root, std::string* out) {
    out_ = out;
    Flow flow = Flow::kNormal;
    return Exec(root, &flow);
  }

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto hit = it->find(name);
      if (hit != it->end()) return hit->second;
    }
    return Global(name);
  }

  Value Function(std::string name,
                 std::function<absl::StatusOr<Value>(const Args&, const Kwargs&)> fn) const {
    auto c = std::make_shared<Callable>();
    c->name = std::move(name);
    c->fn = std::move(fn);
    return Value{.kind = Value::Kind::kCallable, .callable = std::move(c)};
  }

  Value Global(const std::string& name) const {
    if (name == "namespace") {
      return Function(name, [](const Args& args, const Kwargs& kwargs) -> absl::StatusOr<Value> {
        Value ns = Value::Dict({});
        ns.is_namespace = true;
        if (!args.empty() && args[0].kind == Value::Kind::kObject) *ns.object = *args[0].object;
        for (const auto& [k, v] : kwargs) ns.object->push_back({k, v});
        return ns;
      });
    }
    if (name == "range") {
      return Function(name, [](const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
        int64_t start = 0, stop = 0, step = 1;
        if (args.size() == 1) {
          stop = args[0].i;
        } else if (args.size() >= 2) {
          start = args[0].i;
          stop = args[1].i;
          if (args.size() > 2) step = args[2].i;
        }
        if (step == 0) return absl::InvalidArgumentError("chat template: range() step is 0");
        Array out;
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
          if (out.size() >= static_cast<size_t>(kMaxIterations)) {
            return absl::InvalidArgumentError("chat template: range() too long");
          }
          out.push_back(Value::Int(i));
        }
        return Value::List(std::move(out));
      });
    }
    if (name == "raise_exception") {
      return Function(name, [](const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
        return absl::InvalidArgumentError(
            absl::StrCat("chat template: ", args.empty() ? "raise_exception" : ToText(args[0])));
      });
    }
    if (name == "strftime_now") {
      return Function(name, [](const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        char buf[256];
        const std::string fmt = args.empty() ? "%Y-%m-%d" : ToText(args[0]);
        const size_t n = std::strftime(buf, sizeof(buf), fmt.c_str(), &tm);
        return Value::Str(std::string(buf, n));
      });
    }
    return Value();
  }

  // ---------------------------------------------------------------- statements

  absl::Status Exec(const Node& n, Flow* flow) {
    switch (n.kind) {
      case Node::Kind::kBody:
        for (const NodePtr& child : n.body) {
          RETURN_IF_ERROR(Exec(*child, flow));
          if (*flow != Flow::kNormal) return absl::OkStatus();
        }
        return absl::OkStatus();
      case Node::Kind::kText:
        return Emit(n.text, n.line);
      case Node::Kind::kOutput: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        return Emit(ToText(v), n.line);
      }
      case Node::Kind::kIf:
        for (const auto& [cond, body] : n.branches) {
          bool take = true;
          if (cond) {
            ASSIGN_OR_RETURN(Value c, Eval(*cond));
            take = Truthy(c);
          }
          if (take) return Exec(*body, flow);
        }
        return absl::OkStatus();
      case Node::Kind::kFor:
        return ExecFor(n, flow);
      case Node::Kind::kSet:
        return ExecSet(n);
      case Node::Kind::kMacro:
        return DefineMacro(n);
      case Node::Kind::kBreak:
        *flow = Flow::kBreak;
        return absl::OkStatus();
      case Node::Kind::kContinue:
        *flow = Flow::kContinue;
        return absl::OkStatus();
    }
    return absl::OkStatus();
  }

  absl::Status Emit(std::string_view text, int line) {
    if (out_->size() + text.size() > kMaxOutput) return RenderError(line, "output too large");
    out_->append(text);
    return absl::OkStatus();
  }

  absl::Status Bind(const std::vector<std::string>& targets, const Value& v, int line) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = v;
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(Array parts, Iterate(v, line));
    if (parts.size() != targets.size()) {
      return RenderError(line, absl::StrCat("cannot unpack ", parts.size(), " values into ",
                                            targets.size(), " names"));
    }
    for (size_t i = 0; i < parts.size(); ++i) scopes_.back()[targets[i]] = parts[i];
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& n, Flow* flow) {
    ASSIGN_OR_RETURN(Value iterable, Eval(*n.expr));
    ASSIGN_OR_RETURN(Array items, Iterate(iterable, n.line));
    if (++depth_ > kMaxDepth) return RenderError(n.line, "loops nest too deep");
    scopes_.emplace_back();
    absl::Status st = absl::OkStatus();
    if (n.filter) {  // `for x in xs if cond`: filtered first, so loop.length counts the kept ones
      Array kept;
      for (const Value& item : items) {
        st = Bind(n.targets, item, n.line);
        if (!st.ok()) break;
        absl::StatusOr<Value> keep = Eval(*n.filter);
        if (!keep.ok()) {
          st = keep.status();
          break;
        }
        if (Truthy(*keep)) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; st.ok() && i < len; ++i) {
      if (++iterations_ > kMaxIterations) {
        st = RenderError(n.line, "too many loop iterations");
        break;
      }
      Object loop{{"index", Value::Int(i + 1)},
                  {"index0", Value::Int(i)},
                  {"revindex", Value::Int(len - i)},
                  {"revindex0", Value::Int(len - i - 1)},
                  {"first", Value::Bool(i == 0)},
                  {"last", Value::Bool(i + 1 == len)},
                  {"length", Value::Int(len)},
                  {"previtem", i > 0 ? items[i - 1] : Value()},
                  {"nextitem", i + 1 < len ? items[i + 1] : Value()}};
      scopes_.back()["loop"] = Value::Dict(std::move(loop));
      st = Bind(n.targets, items[i], n.line);
      if (!st.ok()) break;
      Flow inner = Flow::kNormal;
      st = Exec(*n.body[0], &inner);
      if (inner == Flow::kBreak) break;
    }
    if (st.ok() && len == 0 && n.else_body) st = Exec(*n.else_body, flow);
    scopes_.pop_back();
    --depth_;
    return st;
  }

  absl::Status ExecSet(const Node& n) {
    Value v;
    if (n.expr) {
      ASSIGN_OR_RETURN(v, Eval(*n.expr));
    } else {  // block set: the rendered body
      std::string captured;
      std::string* saved = out_;
      out_ = &captured;
      Flow flow = Flow::kNormal;
      absl::Status st = Exec(*n.body[0], &flow);
      out_ = saved;
      RETURN_IF_ERROR(st);
      v = Value::Str(std::move(captured));
    }
    if (!n.targets.empty() && n.targets[0].empty()) {  // `set a, b = ...`
      return Bind(std::vector<std::string>(n.targets.begin() + 1, n.targets.end()), v, n.line);
    }
    if (n.targets.size() == 2) {  // `set ns.attr = ...`
      Value ns = Lookup(n.targets[0]);
      if (ns.kind != Value::Kind::kObject || !ns.is_namespace) {
        return RenderError(n.line, absl::StrCat("'", n.targets[0], "' is not a namespace"));
      }
      for (auto& [k, e] : *ns.object) {
        if (k == n.targets[1]) {
          e = v;
          return absl::OkStatus();
        }
      }
      ns.object->push_back({n.targets[1], v});
      return absl::OkStatus();
    }
    scopes_.back()[n.targets[0]] = v;
    return absl::OkStatus();
  }

  absl::Status DefineMacro(const Node& n) {
    const Node* macro = &n;
    scopes_.back()[n.targets[0]] =
        Function(n.targets[0],
                 [this, macro](const Args& args, const Kwargs& kwargs) -> absl::StatusOr<Value> {
                   if (++depth_ > kMaxDepth) {
                     --depth_;
                     return RenderError(macro->line, "macro calls nest too deep");
                   }
                   std::map<std::string, Value> frame;
                   for (size_t i = 0; i < macro->params.size(); ++i) {
                     const auto& [name, def] = macro->params[i];
                     Value v;
                     if (i < args.size()) {
                       v = args[i];
                     } else if (def) {
                       absl::StatusOr<Value> d = Eval(*def);
                       if (!d.ok()) {
                         --depth_;
                         return d.status();
                       }
                       v = *d;
                     }
                     for (const auto& [k, kv] : kwargs) {
                       if (k == name) v = kv;
                     }
                     frame[name] = v;
                   }
                   scopes_.push_back(std::move(frame));
                   std::string captured;
                   std::string* saved = out_;
                   out_ = &captured;
                   Flow flow = Flow::kNormal;
                   absl::Status st = Exec(*macro->body[0], &flow);
                   out_ = saved;
                   scopes_.pop_back();
                   --depth_;
                   RETURN_IF_ERROR(st);
                   return Value::Str(std::move(captured));
                 });
    return absl::OkStatus();
  }

  // ---------------------------------------------------------------- expressions

  absl::StatusOr<Value> Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName:
        return Lookup(e.name);
      case Expr::Kind::kList: {
        Array items;
        for (const ExprPtr& item : e.items) {
          ASSIGN_OR_RETURN(Value v, Eval(*item));
          items.push_back(std::move(v));
        }
        return Value::List(std::move(items));
      }
      case Expr::Kind::kDict: {
        Object entries;
        for (size_t i = 0; i + 1 < e.items.size(); i += 2) {
          ASSIGN_OR_RETURN(Value k, Eval(*e.items[i]));
          ASSIGN_OR_RETURN(Value v, Eval(*e.items[i + 1]));
          entries.push_back({ToText(k), std::move(v)});
        }
        return Value::Dict(std::move(entries));
      }
      case Expr::Kind::kAttr: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.a));
        return Attribute(obj, e.name, e.line);
      }
      case Expr::Kind::kItem: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.a));
        ASSIGN_OR_RETURN(Value key, Eval(*e.b));
        return Item(obj, key, e.line);
      }
      case Expr::Kind::kSlice:
        return Slice(e);
      case Expr::Kind::kCall: {
        ASSIGN_OR_RETURN(Value callee, Eval(*e.a));
        if (callee.kind != Value::Kind::kCallable) {
          return RenderError(e.line, absl::StrCat("'", Describe(*e.a), "' is not callable"));
        }
        ASSIGN_OR_RETURN(auto args, Arguments(e));
        ASSIGN_OR_RETURN(Value v, callee.callable->fn(args.first, args.second));
        return Bounded(std::move(v), e.line);
      }
      case Expr::Kind::kFilter: {
        ASSIGN_OR_RETURN(Value v, ApplyFilter(e));
        return Bounded(std::move(v), e.line);
      }
      case Expr::Kind::kTest: {
        ASSIGN_OR_RETURN(bool result, ApplyTest(e));
        return Value::Bool(result != e.negate);
      }
      case Expr::Kind::kUnary: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.a));
        if (e.name == "not") return Value::Bool(!Truthy(v));
        if (!v.number()) return RenderError(e.line, "unary minus of a non-number");
        if (e.name == "+") return v;
        return v.kind == Value::Kind::kInt ? Value::Int(-v.i) : Value::Float(-v.f);
      }
      case Expr::Kind::kCond: {
        ASSIGN_OR_RETURN(Value c, Eval(*e.a));
        if (Truthy(c)) return Eval(*e.b);
        if (e.c) return Eval(*e.c);
        return Value();
      }
      case Expr::Kind::kBinary: {
        ASSIGN_OR_RETURN(Value v, Binary(e));
        return Bounded(std::move(v), e.line);
      }
    }
    return Value();
  }

  // Values that grow by doubling (`s + s` in a loop) stop at the output's bound.
  static absl::StatusOr<Value> Bounded(Value v, int line) {
    if ((v.kind == Value::Kind::kString && v.s.size() > kMaxOutput) ||
        (v.kind == Value::Kind::kArray && v.array->size() > static_cast<size_t>(kMaxIterations))) {
      return RenderError(line, "a value grew too large");
    }
    return v;
  }

  static std::string Describe(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kName:
        return e.name;
      case Expr::Kind::kAttr:
        return Describe(*e.a) + "." + e.name;
      default:
        return "expression";
    }
  }

  absl::StatusOr<std::pair<Args, Kwargs>> Arguments(const Expr& e) {
    std::pair<Args, Kwargs> out;
    for (const ExprPtr& a : e.items) {
      ASSIGN_OR_RETURN(Value v, Eval(*a));
      out.first.push_back(std::move(v));
    }
    for (const auto& [k, a] : e.kwargs) {
      ASSIGN_OR_RETURN(Value v, Eval(*a));
      out.second.push_back({k, std::move(v)});
    }
    return out;
  }

  absl::StatusOr<Value> Item(const Value& obj, const Value& key, int line) {
    if (obj.kind == Value::Kind::kArray && key.kind == Value::Kind::kInt) {
      const int64_t n = static_cast<int64_t>(obj.array->size());
      const int64_t i = key.i < 0 ? key.i + n : key.i;
      return i >= 0 && i < n ? (*obj.array)[i] : Value();
    }
    if (obj.kind == Value::Kind::kString && key.kind == Value::Kind::kInt) {
      const int64_t n = static_cast<int64_t>(obj.s.size());
      const int64_t i = key.i < 0 ? key.i + n : key.i;
      return i >= 0 && i < n ? Value::Str(std::string(1, obj.s[i])) : Value();
    }
    if (key.kind == Value::Kind::kString) return Attribute(obj, key.s, line);
    return Value();
  }

  absl::StatusOr<Value> Slice(const Expr& e) {
    ASSIGN_OR_RETURN(Value obj, Eval(*e.a));
    std::optional<int64_t> bounds[3];
    const ExprPtr parts[3] = {e.b, e.c, e.items[0]};
    for (int i = 0; i < 3; ++i) {
      if (!parts[i]) continue;
      ASSIGN_OR_RETURN(Value v, Eval(*parts[i]));
      if (v.kind == Value::Kind::kNone) continue;
      if (v.kind != Value::Kind::kInt) return RenderError(e.line, "slice bounds must be integers");
      bounds[i] = v.i;
    }
    const int64_t step = bounds[2].value_or(1);
    if (step == 0) return RenderError(e.line, "slice step is 0");
    if (obj.kind == Value::Kind::kArray) {
      Array out;
      for (int64_t i :
           SliceIndices(static_cast<int64_t>(obj.array->size()), bounds[0], bounds[1], step)) {
        out.push_back((*obj.array)[i]);
      }
      return Value::List(std::move(out));
    }
    if (obj.kind == Value::Kind::kString) {
      std::string out;
      for (int64_t i :
           SliceIndices(static_cast<int64_t>(obj.s.size()), bounds[0], bounds[1], step)) {
        out += obj.s[i];
      }
      return Value::Str(std::move(out));
    }
    return RenderError(e.line, absl::StrCat("cannot slice a ", KindName(obj)));
  }

  absl::StatusOr<Value> Attribute(const Value& obj, const std::string& name, int line) {
    if (obj.kind == Value::Kind::kObject) {
      if (const Value* v = obj.Find(name)) return *v;
      if (obj.is_namespace) return Value();
      return DictMethod(obj, name);
    }
    if (obj.kind == Value::Kind::kString) return StringMethod(obj.s, name, line);
    return Value();
  }

  Value DictMethod(const Value& obj, const std::string& name) {
    std::shared_ptr<Object> o = obj.object;
    if (name == "items") {
      return Function(name, [o](const Args&, const Kwargs&) -> absl::StatusOr<Value> {
        Array out;
        for (const auto& [k, v] : *o) out.push_back(Value::List({Value::Str(k), v}));
        return Value::List(std::move(out));
      });
    }
    if (name == "keys" || name == "values") {
      const bool keys = name == "keys";
      return Function(name, [o, keys](const Args&, const Kwargs&) -> absl::StatusOr<Value> {
        Array out;
        for (const auto& [k, v] : *o) out.push_back(keys ? Value::Str(k) : v);
        return Value::List(std::move(out));
      });
    }
    if (name == "get") {
      return Function(name, [o](const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
        if (args.empty()) return absl::InvalidArgumentError("chat template: get() needs a key");
        const std::string key = ToText(args[0]);
        for (const auto& [k, v] : *o) {
          if (k == key) return v;
        }
        return args.size() > 1 ? args[1] : Value::None();
      });
    }
    return Value();
  }

  Value StringMethod(const std::string& s, const std::string& name, int line) {
    auto method = [&](auto fn) {
      return Function(name,
                      [s, fn](const Args& args, const Kwargs& kwargs) -> absl::StatusOr<Value> {
                        return fn(s, args, kwargs);
                      });
    };
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const bool left = name != "rstrip", right = name != "lstrip";
      return method([left, right](const std::string& s, const Args& args,
                                  const Kwargs&) -> absl::StatusOr<Value> {
        const std::string chars = args.empty() || args[0].kind == Value::Kind::kNone
                                      ? std::string(" \t\n\r\f\v")
                                      : ToText(args[0]);
        return Value::Str(StripChars(s, chars, left, right));
      });
    }
    if (name == "startswith" || name == "endswith") {
      const bool start = name == "startswith";
      return method(
          [start](const std::string& s, const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
            if (args.empty())
              return absl::InvalidArgumentError("chat template: startswith() needs an argument");
            Array options = args[0].kind == Value::Kind::kArray ? *args[0].array : Array{args[0]};
            for (const Value& o : options) {
              const std::string x = ToText(o);
              if (start ? s.starts_with(x) : s.ends_with(x)) return Value::Bool(true);
            }
            return Value::Bool(false);
          });
    }
    if (name == "split") {
      return method([](const std::string& s, const Args& args,
                       const Kwargs& kwargs) -> absl::StatusOr<Value> {
        Value sep = args.empty() ? Value::None() : args[0];
        int64_t max_split = args.size() > 1 ? args[1].i : -1;
        for (const auto& [k, v] : kwargs) {
          if (k == "sep") sep = v;
          if (k == "maxsplit") max_split = v.i;
        }
        Array out;
        if (sep.kind == Value::Kind::kNone) {  // runs of whitespace, none at the ends
          std::vector<std::string> parts =
              absl::StrSplit(s, absl::ByAnyChar(" \t\n\r\f\v"), absl::SkipEmpty());
          for (std::string& p : parts) out.push_back(Value::Str(std::move(p)));
          return Value::List(std::move(out));
        }
        const std::string d = ToText(sep);
        if (d.empty()) return absl::InvalidArgumentError("chat template: split() empty separator");
        size_t at = 0;
        for (int64_t n = 0; max_split < 0 || n < max_split; ++n) {
          const size_t hit = s.find(d, at);
          if (hit == std::string::npos) break;
          out.push_back(Value::Str(s.substr(at, hit - at)));
          at = hit + d.size();
        }
        out.push_back(Value::Str(s.substr(at)));
        return Value::List(std::move(out));
      });
    }
    if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
      const std::string which = name;
      return method(
          [which](const std::string& s, const Args&, const Kwargs&) -> absl::StatusOr<Value> {
            if (which == "upper") return Value::Str(Upper(s));
            if (which == "lower") return Value::Str(Lower(s));
            if (which == "title") return Value::Str(Title(s));
            return Value::Str(Capitalize(s));
          });
    }
    if (name == "replace") {
      return method(
          [](const std::string& s, const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
            if (args.size() < 2)
              return absl::InvalidArgumentError("chat template: replace() needs 2 arguments");
            return Value::Str(
                Replace(s, ToText(args[0]), ToText(args[1]), args.size() > 2 ? args[2].i : -1));
          });
    }
    if (name == "find" || name == "count") {
      const bool find = name == "find";
      return method(
          [find](const std::string& s, const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
            if (args.empty())
              return absl::InvalidArgumentError("chat template: find() needs an argument");
            const std::string x = ToText(args[0]);
            if (find) {
              const size_t at = s.find(x);
              return Value::Int(at == std::string::npos ? -1 : static_cast<int64_t>(at));
            }
            int64_t n = 0;
            for (size_t at = x.empty() ? std::string::npos : s.find(x); at != std::string::npos;
                 at = s.find(x, at + x.size())) {
              ++n;
            }
            return Value::Int(n);
          });
    }
    if (name == "join") {
      return method(
          [](const std::string& s, const Args& args, const Kwargs&) -> absl::StatusOr<Value> {
            if (args.empty() || args[0].kind != Value::Kind::kArray) {
              return absl::InvalidArgumentError("chat template: join() needs a list");
            }
            std::vector<std::string> parts;
            for (const Value& v : *args[0].array) parts.push_back(ToText(v));
            return Value::Str(absl::StrJoin(parts, s));
          });
    }
    (void)line;
    return Value();
  }

  absl::StatusOr<Value> Binary(const Expr& e) {
    ASSIGN_OR_RETURN(Value l, Eval(*e.a));
    const std::string& op = e.name;
    if (op == "and") return Truthy(l) ? Eval(*e.b) : absl::StatusOr<Value>(l);
    if (op == "or") return Truthy(l) ? absl::StatusOr<Value>(l) : Eval(*e.b);
    ASSIGN_OR_RETURN(Value r, Eval(*e.b));
    if (op == "==") return Value::Bool(Equal(l, r));
    if (op == "!=") return Value::Bool(!Equal(l, r));
    if (op == "~") return Value::Str(ToText(l) + ToText(r));
    if (op == "in" || op == "not in") {
      bool found = false;
      if (r.kind == Value::Kind::kString) {
        found = r.s.find(ToText(l)) != std::string::npos;
      } else if (r.kind == Value::Kind::kArray) {
        found = std::any_of(r.array->begin(), r.array->end(),
                            [&](const Value& v) { return Equal(v, l); });
      } else if (r.kind == Value::Kind::kObject) {
        found = r.Find(ToText(l)) != nullptr;
      } else if (!r.undefined() && r.kind != Value::Kind::kNone) {
        return RenderError(e.line, absl::StrCat("'in' a ", KindName(r)));
      }
      return Value::Bool(found == (op == "in"));
    }
    if (l.number() && r.number()) {
      const bool ints = l.kind == Value::Kind::kInt && r.kind == Value::Kind::kInt;
      const double a = l.num(), b = r.num();
      if (op == "+") return ints ? Value::Int(l.i + r.i) : Value::Float(a + b);
      if (op == "-") return ints ? Value::Int(l.i - r.i) : Value::Float(a - b);
      if (op == "*") return ints ? Value::Int(l.i * r.i) : Value::Float(a * b);
      if (op == "/") {
        if (b == 0) return RenderError(e.line, "division by zero");
        return Value::Float(a / b);
      }
      if (op == "//" || op == "%") {
        if (b == 0) return RenderError(e.line, "division by zero");
        if (ints) {
          int64_t q = l.i / r.i, m = l.i % r.i;
          if (m != 0 && ((m < 0) != (r.i < 0))) --q, m += r.i;  // Python's floor semantics
          return Value::Int(op == "//" ? q : m);
        }
        const double q = std::floor(a / b);
        return Value::Float(op == "//" ? q : a - q * b);
      }
      if (op == "**") {
        if (ints && r.i >= 0 && r.i < 64) {
          int64_t p = 1;
          for (int64_t k = 0; k < r.i; ++k) p *= l.i;
          return Value::Int(p);
        }
        return Value::Float(std::pow(a, b));
      }
      if (op == "<") return Value::Bool(a < b);
      if (op == ">") return Value::Bool(a > b);
      if (op == "<=") return Value::Bool(a <= b);
      if (op == ">=") return Value::Bool(a >= b);
    }
    if (l.kind == Value::Kind::kString && r.kind == Value::Kind::kString) {
      if (op == "+") return Value::Str(l.s + r.s);
      if (op == "<") return Value::Bool(l.s < r.s);
      if (op == ">") return Value::Bool(l.s > r.s);
      if (op == "<=") return Value::Bool(l.s <= r.s);
      if (op == ">=") return Value::Bool(l.s >= r.s);
    }
    if (op == "+" && (l.kind == Value::Kind::kString || r.kind == Value::Kind::kString)) {
      return Value::Str(ToText(l) + ToText(r));  // as @huggingface/jinja
    }
    if (op == "+" && l.kind == Value::Kind::kArray && r.kind == Value::Kind::kArray) {
      Array out = *l.array;
      out.insert(out.end(), r.array->begin(), r.array->end());
      return Value::List(std::move(out));
    }
    if (op == "*" && l.kind == Value::Kind::kString && r.kind == Value::Kind::kInt) {
      std::string out;
      for (int64_t i = 0; i < r.i && out.size() < kMaxOutput; ++i) out += l.s;
      return Value::Str(std::move(out));
    }
    return RenderError(e.line, absl::StrCat("unsupported operand types for ", op, ": ", KindName(l),
                                            " and ", KindName(r)));
  }

  absl::StatusOr<Value> ApplyFilter(const Expr& e) {
    ASSIGN_OR_RETURN(Value v, Eval(*e.a));
    ASSIGN_OR_RETURN(auto args, Arguments(e));
    const Args& a = args.first;
    auto kwarg = [&](std::string_view k, size_t pos) -> std::optional<Value> {
      for (const auto& [name, value] : args.second) {
        if (name == k) return value;
      }
      if (pos < a.size()) return a[pos];
      return std::nullopt;
    };
    const std::string& f = e.name;
    if (f == "trim") return Value::Str(StripChars(ToText(v), " \t\n\r\f\v", true, true));
    if (f == "tojson") {
      const std::optional<Value> indent = kwarg("indent", 0);
      return Value::Str(ToJson(
          v, indent && indent->kind == Value::Kind::kInt ? static_cast<int>(indent->i) : 0, 0));
    }
    if (f == "length" || f == "count") return Value::Int(Length(v));
    if (f == "upper") return Value::Str(Upper(ToText(v)));
    if (f == "lower") return Value::Str(Lower(ToText(v)));
    if (f == "title") return Value::Str(Title(ToText(v)));
    if (f == "capitalize") return Value::Str(Capitalize(ToText(v)));
    if (f == "string") return Value::Str(ToText(v));
    if (f == "safe" || f == "e" || f == "escape") return v;  // prompts are not HTML
    if (f == "default" || f == "d") {
      const std::optional<Value> fallback = kwarg("default_value", 0);
      const std::optional<Value> boolean = kwarg("boolean", 1);
      const bool use = v.undefined() || (boolean && Truthy(*boolean) && !Truthy(v));
      return use ? fallback.value_or(Value::Str("")) : v;
    }
    if (f == "join") {
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      const std::optional<Value> sep = kwarg("d", 0);
      std::vector<std::string> parts;
      for (const Value& item : items) parts.push_back(ToText(item));
      return Value::Str(absl::StrJoin(parts, sep ? ToText(*sep) : ""));
    }
    if (f == "items") {
      if (v.kind != Value::Kind::kObject) return RenderError(e.line, "items of a non-dict");
      return DictMethod(v, "items").callable->fn({}, {});
    }
    if (f == "list") {
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      return Value::List(std::move(items));
    }
    if (f == "first" || f == "last") {
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      if (items.empty()) return Value();
      return f == "first" ? items.front() : items.back();
    }
    if (f == "reverse") {
      if (v.kind == Value::Kind::kString) return Value::Str(std::string(v.s.rbegin(), v.s.rend()));
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      std::reverse(items.begin(), items.end());
      return Value::List(std::move(items));
    }
    if (f == "int") {
      if (v.kind == Value::Kind::kInt) return v;
      if (v.kind == Value::Kind::kFloat) return Value::Int(static_cast<int64_t>(v.f));
      if (v.kind == Value::Kind::kString) {
        try {
          return Value::Int(std::stoll(v.s));
        } catch (...) {
          return Value::Int(0);
        }
      }
      return Value::Int(0);
    }
    if (f == "float") {
      if (v.number()) return Value::Float(v.num());
      if (v.kind == Value::Kind::kString) {
        try {
          return Value::Float(std::stod(v.s));
        } catch (...) {
          return Value::Float(0);
        }
      }
      return Value::Float(0);
    }
    if (f == "abs") {
      if (!v.number()) return RenderError(e.line, "abs of a non-number");
      return v.kind == Value::Kind::kInt ? Value::Int(v.i < 0 ? -v.i : v.i)
                                         : Value::Float(std::fabs(v.f));
    }
    if (f == "round") {
      if (!v.number()) return RenderError(e.line, "round of a non-number");
      const std::optional<Value> digits = kwarg("precision", 0);
      const double scale = std::pow(10.0, digits ? digits->num() : 0.0);
      return Value::Float(std::nearbyint(v.num() * scale) / scale);
    }
    if (f == "replace") {
      if (a.size() < 2) return RenderError(e.line, "replace needs 2 arguments");
      return Value::Str(Replace(ToText(v), ToText(a[0]), ToText(a[1]), a.size() > 2 ? a[2].i : -1));
    }
    if (f == "indent") {
      const std::optional<Value> width = kwarg("width", 0);
      const std::optional<Value> first = kwarg("first", 1);
      const std::string pad(width ? static_cast<size_t>(width->i) : 4, ' ');
      std::vector<std::string> lines = absl::StrSplit(ToText(v), '\n');
      for (size_t i = 0; i < lines.size(); ++i) {
        if ((i > 0 || (first && Truthy(*first))) && !lines[i].empty()) lines[i] = pad + lines[i];
      }
      return Value::Str(absl::StrJoin(lines, "\n"));
    }
    if (f == "unique") {
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      Array out;
      for (const Value& item : items) {
        if (std::none_of(out.begin(), out.end(), [&](const Value& o) { return Equal(o, item); })) {
          out.push_back(item);
        }
      }
      return Value::List(std::move(out));
    }
    if (f == "map" || f == "selectattr" || f == "rejectattr" || f == "select" || f == "reject") {
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      Array out;
      for (const Value& item : items) {
        if (f == "map") {
          const std::optional<Value> attr = kwarg("attribute", 99);
          if (!attr) return RenderError(e.line, "map is supported with attribute= only");
          ASSIGN_OR_RETURN(Value got, Attribute(item, ToText(*attr), e.line));
          out.push_back(got);
          continue;
        }
        const bool by_attr = f == "selectattr" || f == "rejectattr";
        Value subject = item;
        size_t test_at = 0;
        if (by_attr) {
          if (a.empty()) return RenderError(e.line, absl::StrCat(f, " needs an attribute"));
          ASSIGN_OR_RETURN(subject, Attribute(item, ToText(a[0]), e.line));
          test_at = 1;
        }
        bool keep = Truthy(subject);
        if (a.size() > test_at) {
          Args rest(a.begin() + test_at + 1, a.end());
          ASSIGN_OR_RETURN(keep, Test(ToText(a[test_at]), subject, rest, e.line));
        }
        if (keep == (f == "select" || f == "selectattr")) out.push_back(item);
      }
      return Value::List(std::move(out));
    }
    if (f == "sort") {
      ASSIGN_OR_RETURN(Array items, Iterate(v, e.line));
      const std::optional<Value> attr = kwarg("attribute", 99);
      const std::optional<Value> reverse = kwarg("reverse", 0);
      auto key = [&](const Value& x) {
        return attr ? Attribute(x, ToText(*attr), e.line).value_or(Value()) : x;
      };
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        const Value kx = key(x), ky = key(y);
        if (kx.number() && ky.number()) return kx.num() < ky.num();
        return ToText(kx) < ToText(ky);
      });
      if (reverse && Truthy(*reverse)) std::reverse(items.begin(), items.end());
      return Value::List(std::move(items));
    }
    return RenderError(e.line, absl::StrCat("unsupported filter '", f, "'"));
  }

  absl::StatusOr<bool> ApplyTest(const Expr& e) {
    ASSIGN_OR_RETURN(Value v, Eval(*e.a));
    ASSIGN_OR_RETURN(auto args, Arguments(e));
    return Test(e.name, v, args.first, e.line);
  }

  absl::StatusOr<bool> Test(const std::string& t, const Value& v, const Args& a, int line) {
    using K = Value::Kind;
    if (t == "defined") return !v.undefined();
    if (t == "undefined") return v.undefined();
    if (t == "none") return v.kind == K::kNone;
    if (t == "string") return v.kind == K::kString;
    if (t == "number") return v.number();
    if (t == "integer") return v.kind == K::kInt;
    if (t == "float") return v.kind == K::kFloat;
    if (t == "boolean") return v.kind == K::kBool;
    if (t == "true") return v.kind == K::kBool && v.b;
    if (t == "false") return v.kind == K::kBool && !v.b;
    if (t == "mapping") return v.kind == K::kObject;
    if (t == "iterable") return v.kind == K::kArray || v.kind == K::kObject || v.kind == K::kString;
    if (t == "sequence") return v.kind == K::kArray || v.kind == K::kString || v.kind == K::kObject;
    if (t == "callable") return v.kind == K::kCallable;
    if (t == "odd" || t == "even") {
      if (v.kind != K::kInt) return RenderError(line, absl::StrCat("'", t, "' of a non-integer"));
      return (v.i % 2 != 0) == (t == "odd");
    }
    if (t == "divisibleby") {
      if (v.kind != K::kInt || a.empty() || a[0].kind != K::kInt || a[0].i == 0) {
        return RenderError(line, "'divisibleby' needs integers");
      }
      return v.i % a[0].i == 0;
    }
    const bool cmp = t == "eq" || t == "equalto" || t == "==" || t == "ne" || t == "!=" ||
                     t == "lt" || t == "le" || t == "gt" || t == "ge" || t == "in" || t == "sameas";
    if (cmp) {
      if (a.empty()) return RenderError(line, absl::StrCat("'", t, "' needs an argument"));
      const Value& o = a[0];
      if (t == "eq" || t == "equalto" || t == "==" || t == "sameas") return Equal(v, o);
      if (t == "ne" || t == "!=") return !Equal(v, o);
      if (t == "in") {
        if (o.kind == K::kString) return o.s.find(ToText(v)) != std::string::npos;
        if (o.kind == K::kObject) return o.Find(ToText(v)) != nullptr;
        if (o.kind == K::kArray) {
          return std::any_of(o.array->begin(), o.array->end(),
                             [&](const Value& x) { return Equal(x, v); });
        }
        return false;
      }
      if (v.number() && o.number()) {
        const double x = v.num(), y = o.num();
        return t == "lt" ? x < y : t == "le" ? x <= y : t == "gt" ? x > y : x >= y;
      }
      const std::string x = ToText(v), y = ToText(o);
      return t == "lt" ? x < y : t == "le" ? x <= y : t == "gt" ? x > y : x >= y;
    }
    return RenderError(line, absl::StrCat("unsupported test '", t, "'"));
  }

  std::vector<std::map<std::string, Value>> scopes_;
  std::string* out_ = nullptr;
  int depth_ = 0;
  int64_t iterations_ = 0;
};

}  // namespace

absl::StatusOr<Template> Template::Parse(std::string_view source) {
  ASSIGN_OR_RETURN(std::vector<Piece> pieces, Lex(source));
  Parser parser(std::move(pieces));
  ASSIGN_OR_RETURN(NodePtr root, parser.Parse());
  Template t;
  t.root_ = std::move(root);
  return t;
}

absl::StatusOr<std::string> Template::Render(const nlohmann::ordered_json& context) const {
  std::string out;
  Renderer renderer(context);
  RETURN_IF_ERROR(renderer.Run(*root_, &out));
  return out;
}

}  // namespace moleserve::engine::jinja
