// Today's WhiteNote's side of its SQLite file, through its own data layer (Prisma Client 7 with
// @prisma/adapter-better-sqlite3, as its src/lib/prisma.ts sets it up), for the tests.
// Usage: node webapp_prisma.cjs CLIENT_DIR DATABASE_URL COMMAND < input.json; prints one JSON value.
//   setup: {"users": [{"email", "aiConfig": {...}, "workspaces": [{"name", "isDefault",
//          "enableAutoTag", "ragflowDatasetId"}]}]} -> [{"id", "workspaces": [id, ...]}]
//   act:   {"ops": [op, ...], "pause": [low, high]} -> each op in turn, as the web app's routes
//          and jobs write, a random pause (ms) before each; an op that fails is recorded and
//          the next one goes on: {"results": [id or null, ...], "errors": ["op n: message", ...]}
//          ops: {"op": "note", "authorId", "workspaceId", "content", "tags": [names]}
//               {"op": "tag", "id", "names"}          what its auto-tag job links
//               {"op": "edit", "id", "content"}       a version of the old content, then the edit
//               {"op": "comment", "messageId", "authorId", "content"}
//               {"op": "delete", "id"}
//   read:  every message, comment and tag, with their tags, times as ISO text
'use strict'
const { PrismaBetterSqlite3 } = require('@prisma/adapter-better-sqlite3')

async function upsertTags(prisma, names) {
  // As the web app's tag helper: names trimmed and lower-cased, the missing ones created.
  const wanted = [...new Set(names.map((name) => name.trim().toLowerCase()).filter(Boolean))]
  const found = await prisma.tag.findMany({ where: { name: { in: wanted } } })
  const missing = wanted.filter((name) => !found.some((tag) => tag.name === name))
  if (missing.length) await prisma.tag.createMany({ data: missing.map((name) => ({ name })) })
  const all = await prisma.tag.findMany({ where: { name: { in: wanted } } })
  return wanted.map((name) => all.find((tag) => tag.name === name).id)
}

const OPS = {
  async note(prisma, { authorId, workspaceId, content, tags }) {
    const tagIds = tags && tags.length ? await upsertTags(prisma, tags) : []
    const message = await prisma.message.create({
      data: {
        content, authorId, workspaceId: workspaceId || null,
        tags: tagIds.length ? { create: tagIds.map((tagId) => ({ tagId })) } : undefined,
      },
    })
    return message.id
  },
  async tag(prisma, { id, names }) {
    const tagIds = await upsertTags(prisma, names)
    await prisma.messageTag.createMany({ data: tagIds.map((tagId) => ({ messageId: id, tagId })) })
    return id
  },
  async edit(prisma, { id, content }) {
    const old = await prisma.message.findUnique({ where: { id } })
    await prisma.messageVersion.create({ data: { messageId: id, content: old.content } })
    await prisma.message.update({ where: { id }, data: { content } })
    return id
  },
  async comment(prisma, { messageId, authorId, content }) {
    return (await prisma.comment.create({ data: { messageId, authorId, content } })).id
  },
  async delete(prisma, { id }) {
    await prisma.comment.deleteMany({ where: { messageId: id } })
    await prisma.message.delete({ where: { id } })
    return id
  },
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const iso = (date) => (date ? date.toISOString() : null)
const tagsOf = (links) => links.map(({ tag }) => ({ name: tag.name, color: tag.color, createdAt: iso(tag.createdAt) }))

async function main() {
  const [clientDir, url, command] = process.argv.slice(2)
  const input = JSON.parse(require('fs').readFileSync(0, 'utf8') || 'null')
  const { PrismaClient } = require(clientDir)
  const prisma = new PrismaClient({ adapter: new PrismaBetterSqlite3({ url }) })
  let result
  try {
    if (command === 'setup') {
      result = []
      for (const { email, aiConfig, workspaces } of input.users) {
        const user = await prisma.user.create({ data: { email, passwordHash: 'x' } })
        if (aiConfig) await prisma.aiConfig.create({ data: { userId: user.id, ...aiConfig } })
        const ids = []
        for (const workspace of workspaces || []) {
          ids.push((await prisma.workspace.create({ data: { userId: user.id, ...workspace } })).id)
        }
        result.push({ id: user.id, workspaces: ids })
      }
    } else if (command === 'act') {
      result = { results: [], errors: [] }
      const [low, high] = input.pause || [0, 0]
      for (const [n, op] of input.ops.entries()) {
        if (high > 0) await sleep(low + Math.random() * (high - low))
        try {
          result.results.push(await OPS[op.op](prisma, op))
        } catch (error) {
          result.results.push(null)
          result.errors.push(`op ${n} (${op.op}): ${error.message}`)
        }
      }
    } else if (command === 'read') {
      const messages = await prisma.message.findMany({ include: { tags: { include: { tag: true } } } })
      const comments = await prisma.comment.findMany({ include: { tags: { include: { tag: true } } } })
      const tags = await prisma.tag.findMany()
      result = {
        messages: messages.map((m) => ({
          id: m.id, content: m.content, authorId: m.authorId, workspaceId: m.workspaceId, isPinned: m.isPinned,
          createdAt: iso(m.createdAt), updatedAt: iso(m.updatedAt), tags: tagsOf(m.tags),
        })),
        comments: comments.map((c) => ({ id: c.id, content: c.content, createdAt: iso(c.createdAt), tags: tagsOf(c.tags) })),
        tags: tags.map((t) => ({ id: t.id, name: t.name, color: t.color, createdAt: iso(t.createdAt) })),
        versions: await prisma.messageVersion.count(),
      }
    } else {
      throw new Error(`unknown command ${command}`)
    }
  } finally {
    await prisma.$disconnect()
  }
  process.stdout.write(JSON.stringify(result))
}

main().catch((error) => {
  console.error(error)
  process.exit(1)
})
