-- Minimal init for headless tests: this repository on the runtimepath, nothing from the user.
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h:h")
vim.opt.runtimepath:prepend(root)
vim.opt.packpath = {}
vim.opt.swapfile = false
vim.opt.shadafile = "NONE"
vim.opt.more = false
package.path = root .. "/tests/nvim/?.lua;" .. package.path
